"""CIR datasets: readers for the published layouts, preprocessing, the synthetic benchmark,
TFDS builders and the batched loader.

Readers return a `CIRSplit` (queries + ordered corpus + image paths):
`read_fashioniq`, `read_cirr`, `read_circo`, `read_genecis`, `read_hpfashioniq`,
`read_synthetic`; InstructCIR training JSON lines via `instructcir`.
"""

from cirjax.data.records import CIRSplit, DataError, ImageRef, Query  # noqa: F401
from cirjax.data.fashioniq import read_fashioniq  # noqa: F401
from cirjax.data.cirr import read_cirr  # noqa: F401
from cirjax.data.circo import read_circo  # noqa: F401
from cirjax.data.genecis import read_genecis  # noqa: F401
from cirjax.data.hpfashioniq import read_hpfashioniq  # noqa: F401
