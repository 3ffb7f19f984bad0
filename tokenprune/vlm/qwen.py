class QwenVLAdapter:
    @classmethod
    def matches(cls, model):
        return False
