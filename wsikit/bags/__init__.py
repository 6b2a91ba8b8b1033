"""Feature bags: the versioned wsikit format (:mod:`~wsikit.bags.format`, written by
:mod:`~wsikit.bags.writer`), reading every supported layout (:mod:`~wsikit.bags.read`) and exporting to the
peers' layouts (:mod:`~wsikit.bags.export`). Needs only numpy, h5py and zarr (torch only for ``.pt`` files).
"""

from wsikit.bags.export import EXPORT_LAYOUTS, export_bag, export_bags, require_positions
from wsikit.bags.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Bag,
    BagError,
    bag_files,
    bag_path,
    iter_bags,
    join_context,
    new_attrs,
)
from wsikit.bags.read import open_features, read_bag, read_bag_shape
from wsikit.bags.writer import BagWriter, write_bag

__all__ = [
    "EXPORT_LAYOUTS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Bag",
    "BagError",
    "BagWriter",
    "bag_files",
    "bag_path",
    "export_bag",
    "export_bags",
    "iter_bags",
    "join_context",
    "new_attrs",
    "open_features",
    "read_bag",
    "read_bag_shape",
    "require_positions",
    "write_bag",
]
