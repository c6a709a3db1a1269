"""Libraries that speak fsspec or pyarrow filesystems: zarr v3, pandas, pyarrow."""
from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import zarr


@pytest.fixture
def fs(volume):
    return fsspec.filesystem("bale")


def test_zarr_v3_round_trip(fs) -> None:
    g = zarr.open_group("bale://vol/arr.zarr", mode="w")
    values = np.arange(120 * 90, dtype="f8").reshape(120, 90) / 7
    a = g.create_array("x", shape=values.shape, chunks=(25, 40), dtype="f8")
    a[:] = values
    g.attrs["note"] = "hello"
    ints = g.create_array("sub/ints", shape=(1000,), chunks=(128,), dtype="i4")
    ints[:] = np.arange(1000, dtype="i4") * 3
    assert fs.exists("vol/arr.zarr/zarr.json")
    assert fs.isdir("vol/arr.zarr/x")
    g2 = zarr.open_group("bale://vol/arr.zarr", mode="r")
    np.testing.assert_array_equal(g2["x"][:], values)
    np.testing.assert_array_equal(g2["x"][17:33, 5:77], values[17:33, 5:77])
    np.testing.assert_array_equal(g2["sub/ints"][:], np.arange(1000, dtype="i4") * 3)
    assert g2.attrs["note"] == "hello"
    assert sorted(g2.array_keys()) == ["x"]
    g3 = zarr.open_group("bale://vol/arr.zarr", mode="r+")
    g3["x"][0, :] = -1.0
    np.testing.assert_array_equal(zarr.open_group("bale://vol/arr.zarr", mode="r")["x"][0, :], np.full(90, -1.0))


@pytest.fixture
def table_df() -> pd.DataFrame:
    n = 5000
    return pd.DataFrame({"i": np.arange(n), "f": np.linspace(0, 1, n), "s": [f"row-{k}" for k in range(n)],
                         "c": pd.Categorical(["a", "b", "c", "d"] * (n // 4))})


def test_pandas_parquet(fs, table_df: pd.DataFrame) -> None:
    table_df.to_parquet("bale://vol/t.parquet")
    assert fs.info("vol/t.parquet")["size"] > 0
    back = pd.read_parquet("bale://vol/t.parquet")
    pd.testing.assert_frame_equal(back, table_df)
    cols = pd.read_parquet("bale://vol/t.parquet", columns=["s"])
    assert list(cols["s"]) == list(table_df["s"])
    table_df.to_csv("bale://vol/t.csv", index=False)
    pd.testing.assert_frame_equal(pd.read_csv("bale://vol/t.csv"), table_df, check_dtype=False, check_categorical=False)


def test_pyarrow_reads_through_fsspec_and_pyfilesystem(fs, table_df: pd.DataFrame) -> None:
    table_df.to_parquet("bale://vol/t.parquet")
    expected = pq.read_table(pa.BufferReader(fs.cat_file("vol/t.parquet")))
    t1 = pq.read_table("vol/t.parquet", filesystem=fs)
    assert t1.equals(expected)
    pd.testing.assert_frame_equal(t1.to_pandas(), table_df)
    pyfs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    t2 = pq.read_table("vol/t.parquet", filesystem=pyfs)
    assert t2.equals(expected)
    info = pyfs.get_file_info("vol/t.parquet")
    assert info.type == pafs.FileType.File and info.size == fs.info("vol/t.parquet")["size"]
    assert pyfs.get_file_info("vol/missing").type == pafs.FileType.NotFound
    with pyfs.open_input_file("vol/t.parquet") as f:
        assert f.read(4) == b"PAR1"
        f.seek(-4, 2)
        assert f.read() == b"PAR1"


def test_pyarrow_dataset_listing(fs, table_df: pd.DataFrame) -> None:
    pyfs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    table = pa.Table.from_pandas(table_df, preserve_index=False)
    for part, chunk in enumerate([table.slice(0, 2000), table.slice(2000, 1500), table.slice(3500)]):
        pq.write_table(chunk, f"vol/ds/part={part}/data-{part}.parquet", filesystem=pyfs)
    fs.pipe_file("vol/ds/_SUCCESS", b"")
    listed = pyfs.get_file_info(pafs.FileSelector("vol/ds", recursive=True))
    assert sorted(i.path for i in listed if i.type == pafs.FileType.File) == [
        "vol/ds/_SUCCESS", "vol/ds/part=0/data-0.parquet", "vol/ds/part=1/data-1.parquet", "vol/ds/part=2/data-2.parquet"]
    shallow = pyfs.get_file_info(pafs.FileSelector("vol/ds", recursive=False))
    assert sorted(i.path for i in shallow) == ["vol/ds/_SUCCESS", "vol/ds/part=0", "vol/ds/part=1", "vol/ds/part=2"]
    dset = ds.dataset("vol/ds", filesystem=pyfs, format="parquet", partitioning="hive", exclude_invalid_files=True)
    assert sorted(dset.files) == ["vol/ds/part=0/data-0.parquet", "vol/ds/part=1/data-1.parquet", "vol/ds/part=2/data-2.parquet"]
    got = dset.to_table().sort_by("i")
    assert got.num_rows == table.num_rows
    assert got.column("i").to_pylist() == table.column("i").to_pylist()
    assert got.column("part").to_pylist() == [0] * 2000 + [1] * 1500 + [2] * 1500
    dset2 = ds.dataset("vol/ds/part=1", filesystem=fs, format="parquet")  # the fsspec filesystem directly
    assert dset2.to_table().num_rows == 1500
