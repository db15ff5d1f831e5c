"""benchmarks/peer_verl_fixes.py: the repair of verl 0.9.1's nested 3-D position ids for batches of one length.

verl is not installed here (its wheels are cp312, for the GPU machine); these tests build the tensors the way its
engine workers do (`torch.nested.as_nested_tensor` over per-sequence 4 x tokens ids) and check the tensor that
verl's `maybe_fix_3d_position_ids` then marks (ragged index 2) is consistent."""

import torch

from benchmarks.peer_verl_fixes import rebuild_uniform_position_ids


def position_ids(lengths: list[int]) -> list[torch.Tensor]:
    """Per-sequence ids as Qwen2.5-VL has them (4 rows: text + 3 M-RoPE), each value distinct."""
    return [torch.arange(4 * n).view(4, n) + 10_000 * i for i, n in enumerate(lengths)]


def marked_by_verl(data: dict) -> torch.Tensor:
    ids = data["position_ids"]
    ids._ragged_idx = 2  # what verl's maybe_fix_3d_position_ids does to every 3-D nested position ids
    return ids


def test_one_length_is_rebuilt_with_the_tokens_ragged():
    sequences = position_ids([7, 7, 7])
    data = {"position_ids": torch.nested.as_nested_tensor(sequences, layout=torch.jagged)}
    assert data["position_ids"]._ragged_idx == 1  # torch's choice when no size differs: the 4 rows

    assert rebuild_uniform_position_ids(data)
    ids = marked_by_verl(data)
    assert ids.values().shape == (4, 21)
    assert ids.offsets().tolist() == [0, 7, 14, 21]
    for got, want in zip(ids.unbind(), sequences, strict=True):  # verl's index selection unbinds
        assert torch.equal(got, want)
    # verl's FSDP engine without remove-padding pads them to the batch's longest sequence
    padded = torch.nested.to_padded_tensor(ids, padding=0, output_size=(3, 4, 9))
    assert torch.equal(padded[:, :, :7], torch.stack(sequences))
    assert not padded[:, :, 7:].any()


def test_the_repaired_tensor_is_what_unequal_lengths_give():
    uniform = {"position_ids": torch.nested.as_nested_tensor(position_ids([5, 5]), layout=torch.jagged)}
    rebuild_uniform_position_ids(uniform)
    # a batch of unequal lengths, for reference: torch makes the tokens ragged itself
    reference = torch.nested.as_nested_tensor(position_ids([5, 6]), layout=torch.jagged)
    assert reference._ragged_idx == 2
    assert uniform["position_ids"]._ragged_idx == reference._ragged_idx
    assert uniform["position_ids"].values().shape[0] == reference.values().shape[0] == 4


def test_the_broken_tensor_of_verl_without_the_repair_fails_to_unbind():
    data = {"position_ids": torch.nested.as_nested_tensor(position_ids([7, 7, 7]), layout=torch.jagged)}
    ids = marked_by_verl(data)
    try:
        ids.unbind()
    except RuntimeError:
        return
    raise AssertionError("unbinding the unrepaired tensor worked: the repair may no longer be needed")


def test_other_position_ids_are_left_alone():
    unequal = torch.nested.as_nested_tensor(position_ids([5, 6]), layout=torch.jagged)
    lost_mark = torch.nested.as_nested_tensor(position_ids([5, 6]), layout=torch.jagged)
    lost_mark._ragged_idx = 1  # what a tensordict pickle round trip leaves, which verl's own fix marks again
    flat = torch.nested.as_nested_tensor([torch.arange(5), torch.arange(5)], layout=torch.jagged)
    padded = torch.zeros(2, 4, 9, dtype=torch.long)
    for value in (unequal, lost_mark, flat, padded):
        data = {"position_ids": value}
        assert not rebuild_uniform_position_ids(data)
        assert data["position_ids"] is value
    assert not rebuild_uniform_position_ids({"input_ids": padded})
