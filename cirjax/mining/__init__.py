"""QuRe hard-negative mining, vectorised and exact to the reference code.

For every training query, QuRe ranks its mining corpus by score and takes as hard negatives
the images lying between the two steepest score drops *below the target* (paper §3.2,
Eqs. 4-7). The exact algorithm (docs/reference_semantics.md#mining) is, per query:

1. Rank the corpus by score, descending; ties by corpus position, ascending (a stable sort).
2. `p` = the target's position in that order. The *after-target list* is positions
   `p+1 .. N-1` (positional: entries tied with the target but sorted after it are included).
   With `strict_below=True` (the paper's Eq. 5) it is every entry scoring strictly below the
   target instead.
3. Drops `d_j = a_{j+1} - a_j` along the after-target list; rank the `j` by `d_j` ascending
   (steepest first), ties by `j` ascending.
4. Walk that ranking in adjacent pairs `(r, r+1)`, r = 0, 1, ...; with `i1 < i2` the pair's
   drops, accept the first pair with `i2 - i1 > consecutive_threshold`.
5. The set is after-target positions `i1+1 .. i2` inclusive, in descending score order.
6. With `image_ids` (corpus entries may repeat an image), the set becomes the unique image ids
   in order of first occurrence, without the target's id.
7. Fewer than 3 after-target entries, or no acceptable pair: an empty set (counted in the
   statistics; the sampler falls back to the warm-up pool).
8. NaN or +-inf scores are a `ValueError` naming the query row and the column: with an
   infinite score the drops are undefined (inf - inf = NaN), so no rule would be faithful.

How it runs: the query axis is cut into blocks sized to a memory budget, and each block is
mined by one of two paths with identical results (`method=`; tested bit for bit): `"numpy"`,
the CPU path (`cirjax.mining.cpu`, the default on a CPU backend: NumPy sorts of packed
integer keys in a thread pool), or `"xla"`, the accelerator path
(`cirjax.mining.accelerator`, the default elsewhere: one jitted, optionally sharded kernel
call per block, exact for subnormal scores, the ragged result gathered on device).

Results are numpy arrays on the host, ragged: `indices[offsets[i]:offsets[i+1]]` is query
`i`'s set. They do not depend on the block size or the number of devices (tested).

The package, one module per part of the job:

* `sets` -- the results (`HardNegativeSets`, `MiningStats`, the implicit `WholeCorpusSets`),
  their checks and the de-duplication by image id;
* `blocks` -- the blocked loop's shared host pieces (block functions, the memory budget);
* `cpu`, `accelerator` -- the two paths;
* `driver` -- `hard_negative_sets`, which checks its arguments and picks the path;
* `sampling` -- drawing one negative per query per step from the sets (`NegativeSampler`;
  `GroupSampler` over a run's mining groups), reproducibly and resumably;
* `audit` -- false negatives of each strategy's pools against full relevant sets;
* `plots` -- the paper's figures of a mining (matplotlib, imported on use);
* `groups` -- a training run's mining corpora (one per training split);
* `rounds` -- one mining round of a training run (encode, score on device, mine, measure).

This module re-exports the mining's public names; `sampling`, `audit`, `plots`, `groups` and
`rounds` are imported as modules (`from cirjax.mining import sampling`).
"""

from cirjax.mining.blocks import (DEFAULT_MEMORY_BUDGET, ScoresOrBlockFn,
                                  block_rows_for_budget)
from cirjax.mining.driver import METHODS, STRATEGIES, hard_negative_sets, resolve_method
from cirjax.mining.sets import (STATUS_EMPTY_AFTER_DEDUP, STATUS_FEW_AFTER, STATUS_NAMES,
                                STATUS_NO_PAIR, STATUS_OK, HardNegativeSets, MiningStats,
                                WholeCorpusSets, first_positions, whole_corpus_sets)

__all__ = ["HardNegativeSets", "MiningStats", "WholeCorpusSets", "hard_negative_sets",
           "whole_corpus_sets", "first_positions", "block_rows_for_budget", "resolve_method",
           "STRATEGIES", "METHODS", "DEFAULT_MEMORY_BUDGET", "ScoresOrBlockFn",
           "STATUS_OK", "STATUS_FEW_AFTER", "STATUS_NO_PAIR", "STATUS_EMPTY_AFTER_DEDUP",
           "STATUS_NAMES"]
