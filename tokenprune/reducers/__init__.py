"""Built-in reducers; importing this package registers them."""
from . import cls, merge, random_drop  # noqa: F401
