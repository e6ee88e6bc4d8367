"""data.domains: named text sources written domain by domain, each with its own validation documents.

Reference: each domain's held-out files, read and tokenized here with the run's tokenizer, end-of-text after each.
"""

import glob
import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from leantrain.errors import UserError
from leantrain.trainer.config import load_config
from leantrain.trainer.data import DataConfig, build_data, is_validation

SEQ = 32


def domains_config(corpus_glob: str, prose_glob: str, cache_dir, **overrides) -> DataConfig:
    fields = dict(source="text", domains={"code": corpus_glob, "prose": prose_glob}, vocab_size=512, seq_len=SEQ,
                  val_fraction=0.2, cache_dir=str(cache_dir))
    return DataConfig(**{**fields, **overrides})


def held_out_ids(pattern: str, tokenizer: Tokenizer, eos: int, val_fraction: float) -> list[int]:
    ids: list[int] = []
    for index, path in enumerate(sorted(glob.glob(pattern))):
        if is_validation(index, val_fraction):
            ids += tokenizer.encode(open(path, encoding="utf-8").read(), add_special_tokens=False).ids + [eos]
    return ids


def test_each_domain_holds_out_its_own_documents_and_validates_alone(corpus_glob, prose_glob, cache_dir):
    data = build_data(domains_config(corpus_glob, prose_glob, cache_dir), seed=0)
    assert data.domain_names == ["code", "prose"]
    meta = json.loads((data.directory / "meta.json").read_text())
    code, prose = meta["domains"]
    assert code["documents"] == {"train": 15, "val": 3} and prose["documents"] == {"train": 32, "val": 8}
    for split in ("train", "val"):  # contiguous, in order, covering the split
        assert code[split][0] == 0 and code[split][1] == prose[split][0] and prose[split][1] == meta["tokens"][split]

    tokenizer = Tokenizer.from_file(data.tokenizer_path)
    val = data.val.read(0, len(data.val))
    for domain, pattern in (code, corpus_glob), (prose, prose_glob):
        expected = held_out_ids(pattern, tokenizer, data.eos_id, 0.2)
        start, end = domain["val"]
        assert val[start:end].tolist() == expected

        # Every validation window of the domain lies wholly inside its token range; all of them are used.
        windows = np.lib.stride_tricks.sliding_window_view(val, SEQ + 1)[::SEQ]
        inside = {w for w in range(len(windows)) if start <= w * SEQ and w * SEQ + SEQ + 1 <= end}
        seen = set()
        for inputs, targets in data.val_batches(1, 0, domain["name"]):
            window = np.concatenate([inputs[0].numpy(), targets[0, -1:].numpy()])
            seen |= {w for w in range(len(windows)) if np.array_equal(windows[w], window)}
        assert seen == inside and len(inside) > 3, domain["name"]


def test_two_ranks_split_each_domains_batches(corpus_glob, prose_glob, cache_dir):
    cfg = domains_config(corpus_glob, prose_glob, cache_dir)
    one = list(build_data(cfg, seed=0).val_batches(4, 3, "prose"))
    ranks = [list(build_data(cfg, seed=0, rank=r, world_size=2).val_batches(2, 3, "prose")) for r in (0, 1)]
    for b, (inputs, _) in enumerate(one):
        assert inputs[:2].equal(ranks[0][b][0]) and inputs[2:].equal(ranks[1][b][0])


def test_domains_through_the_config(corpus_glob, prose_glob):
    cfg = load_config("quickstart", ["data.source=text", f"data.domains.code={corpus_glob}",
                                     f"data.domains.prose={prose_glob}"])
    assert cfg.data.domains == {"code": corpus_glob, "prose": prose_glob}


@pytest.mark.parametrize("overrides, message", [
    (dict(source="stdlib"), "data.domains .* needs data.source=text"),
    (dict(path="x/*.txt"), "needs data.source=text and an empty data.path"),
    (dict(domains={"code prose": "stdlib"}), "domain name 'code prose'"),
    (dict(domains={"code": ""}), "data.domains.code='': give a glob"),
    (dict(domains={"code": "/nonexistent/*.txt"}), "data.domains.code='/nonexistent/\\*.txt': no such file"),
], ids=["source", "path", "name", "empty", "missing"])
def test_bad_domains_name_the_key(corpus_glob, prose_glob, cache_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        build_data(domains_config(corpus_glob, prose_glob, cache_dir, **overrides), seed=0)


def test_a_domain_too_small_to_hold_out_a_document(corpus_glob, prose_glob, cache_dir, tmp_path):
    (tmp_path / "one.txt").write_text("a single document " * 50)
    domains = {"code": corpus_glob, "tiny": str(tmp_path / "*.txt")}
    cfg = domains_config(corpus_glob, prose_glob, cache_dir, domains=domains)
    with pytest.raises(UserError, match="data.domains.tiny: the validation split is empty"):
        build_data(cfg, seed=0)
