"""The tokenprune Gradio demo: the tokens each method keeps, side by side.

    python demos/app.py [--port 7860] [--host 127.0.0.1] [--model-dir DIR] [--tiny]

is the same as ``tokenprune demo ...``; the app itself lives in
``tokenprune/commands/demo.py`` so that it ships with the package
(``tokenprune.commands.demo.build_app()`` returns the Blocks object unlaunched).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from tokenprune.commands import demo  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    demo.add_arguments(p)
    return demo.run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
