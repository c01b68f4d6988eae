"""Which decode graphs the runner captures (the capture itself needs a GPU: benchmarks/throughput
checks the graphs' tokens against the eager twin there)."""

from replica.cuda_graphs import adapter_caps, batch_buckets


def test_every_batch_size_has_a_bucket_that_pads_fewer_than_8_rows():
    for max_num_seqs in (1, 2, 5, 8, 9, 64, 100):
        buckets = batch_buckets(max_num_seqs)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_num_seqs
        for n in range(1, max_num_seqs + 1):
            bucket = next(b for b in buckets if b >= n)
            assert bucket - n < 8


def test_adapter_caps_cover_every_possible_count_once():
    assert adapter_caps(64, 128) == [4, 16, 32, 64]
    assert adapter_caps(128, 128) == [4, 16, 32, 64, 128]
    assert adapter_caps(128, 8) == [4, 8]
    assert adapter_caps(2, 128) == [2]
    for rows, slots in ((1, 1), (8, 3), (24, 128), (128, 128)):
        caps = adapter_caps(rows, slots)
        assert caps[-1] == min(rows, slots) and caps == sorted(set(caps))
