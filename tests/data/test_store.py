"""store.py: prepared pairs memory-mapped from an Arrow file, their lengths without reading the ids, the
cache key's parts, and datasets' private fingerprint (the one place orpo reads it)."""
import datasets
import numpy as np
import pytest

from orpo.data.render import TokenizedPair
from orpo.data.store import (CODE_VERSION, PairTable, cache_key, dataset_fingerprint, file_fingerprint,
                             is_prepared_dir, pair_lengths, publish, read_prepared, tokenizer_fingerprint)
from tiny import chatml_tokenizer

PAIRS = [TokenizedPair([1, 2, 3], [4], [5, 6], 0), TokenizedPair([7], [8, 9], [10], 3),
         TokenizedPair([11, 12], [13, 14, 15], [16, 17, 18, 19], 4)]


def table(pairs=PAIRS) -> PairTable:
    columns = {name: [getattr(p, name) for p in pairs] for name in ("prompt_ids", "chosen_ids", "rejected_ids", "index")}
    return PairTable(datasets.Dataset.from_dict(columns))


def test_a_pair_table_reads_the_pairs_it_holds():
    pairs = table()
    assert len(pairs) == 3 and pairs[1] == PAIRS[1] and pairs[-1] == PAIRS[2]
    assert list(pairs) == PAIRS and pairs == PAIRS
    assert isinstance(pairs[1:], PairTable) and pairs[1:] == PAIRS[1:] and pairs[:0] == []


def test_lengths_come_from_the_arrow_offsets():
    """(prompt, chosen, rejected): (3, 1, 2), (1, 2, 1), (2, 3, 4); a slice keeps its own."""
    assert pair_lengths(table()).tolist() == [[3, 1, 2], [1, 2, 1], [2, 3, 4]]
    assert pair_lengths(table()[1:]).tolist() == [[1, 2, 1], [2, 3, 4]]
    assert pair_lengths(PAIRS).tolist() == [[3, 1, 2], [1, 2, 1], [2, 3, 4]]  # a list: counted in Python
    assert pair_lengths([]).shape == (0, 3) and pair_lengths(table()).dtype == np.int64


def test_a_published_set_is_read_back_memory_mapped(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    table().table.flatten_indices(cache_file_name=str(work / "pairs.arrow"))
    publish(work, tmp_path / "entry", {"rows": 5})
    assert not work.exists() and is_prepared_dir(tmp_path / "entry")
    pairs, meta = read_prepared(tmp_path / "entry")
    assert pairs == PAIRS and meta == {"rows": 5}
    assert pairs.table.cache_files == [{"filename": str(tmp_path / "entry" / "pairs.arrow")}]  # mapped, not loaded
    # a second process publishing the same entry leaves the first one's set in place
    again = tmp_path / "again"
    again.mkdir()
    (again / "pairs.arrow").write_bytes(b"")
    publish(again, tmp_path / "entry", {"rows": 5})
    assert not again.exists() and read_prepared(tmp_path / "entry")[0] == PAIRS


def test_datasets_still_keeps_a_fingerprint_per_dataset():
    """orpo keys the cache of a datasets.Dataset source by `Dataset._fingerprint`, a private member: this
    fails loudly when a datasets release renames it or stops making it a function of the content."""
    a = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    b = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    c = datasets.Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "x"}])
    assert isinstance(dataset_fingerprint(a), str) and len(dataset_fingerprint(a)) >= 16
    assert dataset_fingerprint(a) == dataset_fingerprint(b) != dataset_fingerprint(c)


def test_the_key_changes_with_every_part(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"prompt": "p"}\n')
    before = file_fingerprint(path)
    path.write_text('{"prompt": "q"}\n')  # same size, other content
    assert file_fingerprint(path) != before
    tok = chatml_tokenizer()
    fingerprint = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(chatml_tokenizer()) == fingerprint  # a fresh copy of the same tokenizer
    tok.chat_template = tok.chat_template.replace("\n", " \n")
    assert tokenizer_fingerprint(tok) != fingerprint
    parts = {"source": before, "tokenizer": fingerprint, "fields": {"max_length": 1024}}
    assert cache_key(parts) == cache_key(dict(reversed(parts.items())))
    assert cache_key(parts) != cache_key({**parts, "fields": {"max_length": 512}})
    assert len(CODE_VERSION) == 16


def test_the_tokenizer_fingerprint_does_not_change_when_it_is_used():
    tok = chatml_tokenizer()
    before = tokenizer_fingerprint(tok)
    tok.apply_chat_template([{"role": "user", "content": "why is the sky blue"}], tokenize=True)
    tok("the sky is blue")
    assert tokenizer_fingerprint(tok) == before


@pytest.mark.parametrize("bad", [1.5, "x"])
def test_a_pair_table_index_must_be_a_number(bad):
    with pytest.raises((TypeError, ValueError)):
        table()[bad]
