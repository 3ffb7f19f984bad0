"""Built-in reducers; importing this package registers them."""
from . import cls, merge, random_drop  # noqa: F401
from . import maelre  # noqa: F401,E402
from . import apet, pool  # noqa: F401,E402
from . import threshold  # noqa: F401,E402
from . import diverse, pitome  # noqa: F401,E402
from . import pipeline  # noqa: F401,E402
