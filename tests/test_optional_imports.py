"""The core pass and an exact query run without ``datasets``, ``faiss`` and ``bm25s`` (the GPU
machine has none of them): they are imported only inside the functions that need them.

The child process makes them unimportable the way a machine without them does: ``None`` in
``sys.modules``, so ``import datasets`` raises ``ImportError`` and ``importlib.util.find_spec``
returns ``None``. (A ``sys.meta_path`` finder that raises would also break transformers' own
``find_spec`` probes, which on a machine without the package simply answer "absent".)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import sys
    BLOCKED = ("datasets", "faiss", "bm25s")
    for name in BLOCKED:
        sys.modules[name] = None  # import raises ImportError; find_spec answers None

    import tempfile

    from hf_grass.testing import tiny_gpt2, word_tokenizer

    from hf_grass import AttributionTrainer, GraSSCallback, GraSSConfig, find_influential
    from hf_grass.attribution import run_attribution_pass

    words = [f"w{i}" for i in range(40)]
    tok = word_tokenizer(words)
    model = tiny_gpt2(len(tok))
    texts = [" ".join(words[i : i + 6]) for i in range(0, 30, 3)]
    cache = run_attribution_pass(model, texts, GraSSConfig(cache_dir=tempfile.mkdtemp()), tokenizer=tok,
                                 batch_size=4, disable_progress=True)
    result = find_influential(texts[2], model=model, tokenizer=tok, cache=cache, completion=" w9",
                              k=3, search="exact")
    assert result.documents or result.harmful, result  # helpful > 0 and harmful < 0 only
    loaded = [n for n in BLOCKED if sys.modules.get(n) is not None]
    assert not loaded, loaded
    print("OK", AttributionTrainer.__name__, GraSSCallback.__name__)
    """
)


def test_pass_and_exact_query_without_datasets_faiss_bm25s() -> None:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK AttributionTrainer GraSSCallback" in done.stdout
