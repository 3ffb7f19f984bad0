"""Vision-language models: visual tokens reduced between the vision tower and the language model.

``core`` is the layer every family shares; each family is a thin file (``adapters/llava.py``, ``vlm/qwen.py``,
``vlm/gemma.py``, ``vlm/onevision.py``); ``refuse`` gives the VLM families not supported yet a clear error at
``apply()``.
"""
