"""A repair verl 0.9.1 needs for the work of benchmarks/grpo_step.py, run in each of verl's Ray workers as Ray's
`worker_process_setup_hook` (benchmarks/peer_grpo_step.py copies this file beside verl's run and names it in
`ray_kwargs.ray_init.runtime_env`); nothing of verl is changed on disk. It imports torch and, in `apply`, verl;
nothing of this repository, which verl's processes do not see.

Uniform lengths. verl's engine workers carry Qwen2.5-VL's 3-D position ids (4 rows x tokens per sequence) as a
jagged nested tensor from `torch.nested.as_nested_tensor`, which makes the first dimension whose sizes differ the
ragged one. When every sequence of a batch has the same length, as in this work (one 2,631-token prompt, every
response 1,024 tokens under ignore_eos), no size differs: torch makes the 4 rows ragged (values of sequences x 4
rows by tokens), and verl's `maybe_fix_3d_position_ids` (a workaround for a tensordict pickling bug) then marks
the tokens ragged. Offsets and values disagree: the update's mini-batch selection fails (`split_with_sizes expects
split_sizes to sum exactly to 3655 ..., but got split_sizes=[4, 4, ...]`, H200, 2026-12-07); the log-prob
passes split it through `chunk_tensordict`'s padded fallback (which fails as well under the CPU's torch 2.13).
`apply` rebuilds such a tensor with the tokens ragged, as a batch of unequal lengths is built, before verl's
marking runs. Upstream: verl-project/verl#7899 (open), with a fix of the same kind proposed in #7901; drop this
module when the release measured carries one.
"""

from __future__ import annotations

import sys

import torch

REBUILDS = 0  # tensors rebuilt in this process (benchmarks/peer_verl_probe.py reports it)


def rebuild_uniform_position_ids(data) -> bool:
    """`data["position_ids"]` rebuilt with its tokens ragged if it is the 3-D nested tensor torch builds from
    sequences of one length (ragged rows); True if it was. Any other value (2-D ids, unequal lengths, tokens
    already ragged, a tensor whose marking a pickle lost) is left as it is."""
    if "position_ids" not in data.keys():
        return False
    ids = data["position_ids"]
    if not (isinstance(ids, torch.Tensor) and ids.is_nested and ids.dim() == 3 and ids._ragged_idx == 1):
        return False
    values, offsets = ids.values(), ids.offsets()
    rows = offsets.diff()
    if values.dim() != 2 or int(offsets[-1]) != values.shape[0] or not bool((rows == rows[0]).all()):
        return False
    sequences, per_sequence, tokens = len(rows), int(rows[0]), values.shape[1]
    # (sequences x rows, tokens) -> rows x (sequences x tokens), each sequence's tokens side by side
    by_rows = (
        values.view(sequences, per_sequence, tokens).transpose(0, 1).reshape(per_sequence, -1).contiguous()
    )
    token_offsets = torch.arange(sequences + 1, dtype=offsets.dtype, device=offsets.device) * tokens
    data["position_ids"] = torch.nested.nested_tensor_from_jagged(
        by_rows, offsets=token_offsets, jagged_dim=2
    )
    return True


def apply() -> None:
    """Wraps verl's `maybe_fix_3d_position_ids` so that the rebuild runs first, in its module and in every module
    that has imported it by name already (verl's engine workers and engines do)."""
    from verl.utils import tensordict_utils

    verl_fix = tensordict_utils.maybe_fix_3d_position_ids
    if getattr(verl_fix, "rebuilds_uniform_position_ids", False):
        return

    def maybe_fix_3d_position_ids(data) -> None:
        global REBUILDS
        REBUILDS += rebuild_uniform_position_ids(data)
        verl_fix(data)

    maybe_fix_3d_position_ids.rebuilds_uniform_position_ids = True
    for module in list(sys.modules.values()):
        if getattr(module, "maybe_fix_3d_position_ids", None) is verl_fix:
            module.maybe_fix_3d_position_ids = maybe_fix_3d_position_ids
