"""Work in progress."""
from .base import Adapter


class OpenClipViTAdapter(Adapter):
    @classmethod
    def matches(cls, model) -> bool:
        return False
