#!/usr/bin/env python3
"""Patch a merged folder's config.json and generation_config.json from its plan and tokenizer.

    python merge/update_config.py OUTPUT_DIR           # apply (idempotent)
    python merge/update_config.py OUTPUT_DIR --check   # report drift, write nothing; exit 1 if any

The work is done by zenith_merge.pipeline.output_config.patch_output; this script is its command line.
"""

import sys

from zenith_merge.cli import main

if __name__ == "__main__":
    sys.exit(main(["update-config", *sys.argv[1:]]))
