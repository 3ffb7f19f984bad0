"""Work in progress."""
from .base import Adapter


class HFVideoMAEAdapter(Adapter):
    @classmethod
    def matches(cls, model) -> bool:
        return False
