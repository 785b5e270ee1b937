//! HDF5 plumbing of the checkpoint format: datasets that carry a CRC-32 of their bytes, and
//! the checked reads that turn any HDF5 or checksum failure into a one-line [`Error`].
//!
//! Checksums: every dataset has a `crc32` attribute (u32), the zlib CRC-32 of its elements'
//! little-endian bytes in memory order. For strings it is the CRC-32 of each string's UTF-8
//! bytes followed by one zero byte, in order. In Python: `zlib.crc32(ds[()].tobytes())`.

use crate::{Error, Result};
use hdf5::types::VarLenUnicode;
use std::path::Path;

/// CRC-32 of the little-endian bytes of `values`.
pub fn crc_of<T: Copy, const N: usize>(values: &[T], to_le: impl Fn(T) -> [u8; N]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut buf = Vec::with_capacity(4096 * N);
    for chunk in values.chunks(4096) {
        buf.clear();
        for &v in chunk {
            buf.extend_from_slice(&to_le(v));
        }
        h.update(&buf);
    }
    h.finalize()
}

/// CRC-32 of strings, each followed by a zero byte.
pub fn crc_of_strings<S: AsRef<str>>(values: &[S]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for s in values {
        h.update(s.as_ref().as_bytes());
        h.update(&[0]);
    }
    h.finalize()
}

/// Writes datasets and attributes into one group of a file being created.
pub struct Put<'a> {
    pub group: &'a hdf5::Group,
}

fn h5err(path: &Path, what: &str, e: hdf5::Error) -> Error {
    Error::format(path, format!("{what}: {e}"))
}

/// A string as an HDF5 variable-length UTF-8 string (NUL bytes are not representable).
fn vlen(s: &str) -> hdf5::Result<VarLenUnicode> {
    s.parse::<VarLenUnicode>()
        .map_err(|e| hdf5::Error::from(format!("string not storable: {e}")))
}

impl Put<'_> {
    fn crc(ds: &hdf5::Dataset, crc: u32) -> hdf5::Result<()> {
        ds.new_attr::<u32>().create("crc32")?.write_scalar(&crc)
    }

    /// A float dataset of `shape` (product = values.len()).
    pub fn f32s(&self, name: &str, values: &[f32], shape: &[usize]) -> hdf5::Result<()> {
        let ds = self.group.new_dataset::<f32>().shape(shape).create(name)?;
        ds.write_raw(values)?;
        Self::crc(&ds, crc_of(values, f32::to_le_bytes))
    }

    /// A float dataset of `len` values that are zero except for `runs` (offset, values; in
    /// ascending order, not overlapping), written run by run: the zeros are never built in
    /// memory. The checksum covers all `len` values.
    pub fn f32s_runs(&self, name: &str, len: usize, runs: &[(usize, &[f32])]) -> hdf5::Result<()> {
        let ds = self
            .group
            .new_dataset::<f32>()
            .shape([len])
            .fill_value(0.0f32)
            .create(name)?;
        let zeros = [0u8; 4096];
        let mut h = crc32fast::Hasher::new();
        let zero_run = |h: &mut crc32fast::Hasher, mut n: usize| {
            while n > 0 {
                let k = n.min(zeros.len() / 4);
                h.update(&zeros[..4 * k]);
                n -= k;
            }
        };
        let mut at = 0;
        for &(off, v) in runs {
            if off < at || off + v.len() > len {
                return Err(hdf5::Error::from(format!(
                    "{name}: runs overlap or overrun {len} values"
                )));
            }
            ds.write_slice(v, off..off + v.len())?;
            zero_run(&mut h, off - at);
            h.update(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
            at = off + v.len();
        }
        zero_run(&mut h, len - at);
        Self::crc(&ds, h.finalize())
    }

    /// An unsigned integer dataset of `shape`.
    pub fn u64s(&self, name: &str, values: &[u64], shape: &[usize]) -> hdf5::Result<()> {
        let ds = self.group.new_dataset::<u64>().shape(shape).create(name)?;
        ds.write_raw(values)?;
        Self::crc(&ds, crc_of(values, u64::to_le_bytes))
    }

    /// A signed integer dataset of `shape`.
    pub fn i64s(&self, name: &str, values: &[i64], shape: &[usize]) -> hdf5::Result<()> {
        let ds = self.group.new_dataset::<i64>().shape(shape).create(name)?;
        ds.write_raw(values)?;
        Self::crc(&ds, crc_of(values, i64::to_le_bytes))
    }

    /// A scalar UTF-8 string dataset.
    pub fn text(&self, name: &str, value: &str) -> hdf5::Result<()> {
        let ds = self.group.new_dataset::<VarLenUnicode>().shape(()).create(name)?;
        ds.write_scalar(&vlen(value)?)?;
        Self::crc(&ds, crc_of_strings(&[value]))
    }

    /// A 1-D dataset of UTF-8 strings.
    pub fn texts(&self, name: &str, values: &[String]) -> hdf5::Result<()> {
        let v: Vec<VarLenUnicode> = values.iter().map(|s| vlen(s)).collect::<hdf5::Result<_>>()?;
        let ds = self.group.new_dataset::<VarLenUnicode>().shape(v.len()).create(name)?;
        ds.write_raw(&v[..])?;
        Self::crc(&ds, crc_of_strings(values))
    }

    /// A scalar attribute of the group.
    pub fn attr_u64(&self, name: &str, v: u64) -> hdf5::Result<()> {
        self.group.new_attr::<u64>().create(name)?.write_scalar(&v)
    }

    /// A string attribute of the group.
    pub fn attr_text(&self, name: &str, v: &str) -> hdf5::Result<()> {
        self.group
            .new_attr::<VarLenUnicode>()
            .create(name)?
            .write_scalar(&vlen(v)?)
    }
}

/// Checked reads from one group of an open checkpoint.
pub struct Get<'a> {
    pub group: &'a hdf5::Group,
    pub path: &'a Path,
}

impl Get<'_> {
    fn open(&self, name: &str) -> Result<hdf5::Dataset> {
        self.group
            .dataset(name)
            .map_err(|_| Error::format(self.path, format!("missing dataset {}{name}", self.prefix())))
    }

    fn prefix(&self) -> String {
        let n = self.group.name();
        if n == "/" {
            "/".into()
        } else {
            format!("{n}/")
        }
    }

    fn check(&self, ds: &hdf5::Dataset, name: &str, crc: u32) -> Result<()> {
        let want: u32 = ds
            .attr("crc32")
            .and_then(|a| a.read_scalar())
            .map_err(|e| h5err(self.path, &format!("{}{name}: no crc32 attribute", self.prefix()), e))?;
        if want != crc {
            return Err(Error::format(
                self.path,
                format!(
                    "dataset {}{name} is corrupted (crc32 {crc:08x}, expected {want:08x})",
                    self.prefix()
                ),
            ));
        }
        Ok(())
    }

    fn read<T: hdf5::H5Type>(&self, name: &str) -> Result<(hdf5::Dataset, Vec<T>)> {
        let ds = self.open(name)?;
        let v = ds
            .read_raw::<T>()
            .map_err(|e| h5err(self.path, &format!("reading {}{name}", self.prefix()), e))?;
        Ok((ds, v))
    }

    /// Shape of a dataset.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.open(name)?.shape())
    }

    /// A float dataset, checksum verified.
    pub fn f32s(&self, name: &str) -> Result<Vec<f32>> {
        let (ds, v) = self.read::<f32>(name)?;
        self.check(&ds, name, crc_of(&v, f32::to_le_bytes))?;
        Ok(v)
    }

    /// An unsigned integer dataset, checksum verified.
    pub fn u64s(&self, name: &str) -> Result<Vec<u64>> {
        let (ds, v) = self.read::<u64>(name)?;
        self.check(&ds, name, crc_of(&v, u64::to_le_bytes))?;
        Ok(v)
    }

    /// A signed integer dataset, checksum verified.
    pub fn i64s(&self, name: &str) -> Result<Vec<i64>> {
        let (ds, v) = self.read::<i64>(name)?;
        self.check(&ds, name, crc_of(&v, i64::to_le_bytes))?;
        Ok(v)
    }

    /// A scalar string dataset, checksum verified.
    pub fn text(&self, name: &str) -> Result<String> {
        let ds = self.open(name)?;
        let s: VarLenUnicode = ds
            .read_scalar()
            .map_err(|e| h5err(self.path, &format!("reading {}{name}", self.prefix()), e))?;
        let s = s.as_str().to_string();
        self.check(&ds, name, crc_of_strings(&[&s]))?;
        Ok(s)
    }

    /// A 1-D string dataset, checksum verified.
    pub fn texts(&self, name: &str) -> Result<Vec<String>> {
        let (ds, v) = self.read::<VarLenUnicode>(name)?;
        let v: Vec<String> = v.iter().map(|s| s.as_str().to_string()).collect();
        self.check(&ds, name, crc_of_strings(&v))?;
        Ok(v)
    }

    /// A scalar u64 attribute of the group.
    pub fn attr_u64(&self, name: &str) -> Result<u64> {
        self.group
            .attr(name)
            .and_then(|a| a.read_scalar())
            .map_err(|_| Error::format(self.path, format!("missing or unreadable attribute '{name}'")))
    }

    /// A string attribute of the group.
    pub fn attr_text(&self, name: &str) -> Result<String> {
        self.group
            .attr(name)
            .and_then(|a| a.read_scalar::<VarLenUnicode>())
            .map(|s| s.as_str().to_string())
            .map_err(|_| Error::format(self.path, format!("missing or unreadable attribute '{name}'")))
    }

    /// A subgroup.
    pub fn subgroup(&self, name: &str) -> Result<hdf5::Group> {
        self.group
            .group(name)
            .map_err(|_| Error::format(self.path, format!("missing group {}{name}", self.prefix())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_zlib_reference() {
        // zlib.crc32(b"123456789") == 0xcbf43926
        assert_eq!(crc_of(b"123456789", |b: u8| [b]), 0xcbf4_3926);
        assert_eq!(crc_of_strings(&["12345678"]), crc_of(b"12345678\0", |b: u8| [b]));
    }
}
