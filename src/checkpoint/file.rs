//! One checkpoint file: the HDF5 groups and datasets, the sealed user block, and the atomic
//! write (hidden temporary file, fsync, rename).

use super::format::{Get, Put};
use super::{
    Checkpoint, CheckpointOf, Kind as CheckpointKind, Method, Reference, State, TicketInfo, FORMAT_NAME, FORMAT_VERSION,
};
use crate::comm::{Kind, Ledger, Purpose, Tally};
use crate::model::layout::{Entry, Layout, Role};
use crate::model::partition::Partition;
use crate::{Error, Result};
use std::path::Path;

pub(super) const PURPOSES: [Purpose; 4] = [Purpose::Sync, Purpose::Gradients, Purpose::Metrics, Purpose::Control];
pub(super) const KINDS: [Kind; 4] = [Kind::Allreduce, Kind::Allgather, Kind::Broadcast, Kind::PointToPoint];

/// Ledgers as a `(ranks, 4 purposes, 4 kinds, 3)` table of calls, bytes sent, bytes received.
pub fn ledger_table(ledgers: &[Ledger]) -> Vec<u64> {
    let mut out = Vec::new();
    for l in ledgers {
        for p in PURPOSES {
            for k in KINDS {
                let t = l.entries.get(&(p, k)).copied().unwrap_or_default();
                out.extend([t.calls, t.bytes_sent, t.bytes_received]);
            }
        }
    }
    out
}

pub fn ledgers_from_table(t: &[u64]) -> Vec<Ledger> {
    let per = PURPOSES.len() * KINDS.len() * 3;
    t.chunks(per)
        .map(|c| {
            let mut l = Ledger::default();
            let mut i = 0;
            for p in PURPOSES {
                for k in KINDS {
                    let tally = Tally {
                        calls: c[i],
                        bytes_sent: c[i + 1],
                        bytes_received: c[i + 2],
                    };
                    if tally != Tally::default() {
                        l.entries.insert((p, k), tally);
                    }
                    i += 3;
                }
            }
            l
        })
        .collect()
}

fn role_name(r: &Role) -> (&'static str, i64, i64) {
    match *r {
        Role::Shared => ("shared", -1, -1),
        Role::Partitioned { block, axis } => ("partitioned", block as i64, axis as i64),
    }
}

/// Longest shape the layout table stores (conv weights are 4-D).
const MAX_NDIM: usize = 4;

fn put_layout(parent: &hdf5::Group, name: &str, l: &Layout) -> hdf5::Result<()> {
    let g = parent.create_group(name)?;
    let p = Put { group: &g };
    let n = l.entries.len();
    let names: Vec<String> = l.entries.iter().map(|e| e.name.clone()).collect();
    let mut shape = vec![0u64; n * MAX_NDIM];
    for (i, e) in l.entries.iter().enumerate() {
        for (j, &d) in e.shape.iter().enumerate() {
            shape[i * MAX_NDIM + j] = d as u64;
        }
    }
    let roles: Vec<String> = l.entries.iter().map(|e| role_name(&e.role).0.to_string()).collect();
    p.texts("name", &names)?;
    p.u64s("shape", &shape, &[n, MAX_NDIM])?;
    p.u64s(
        "ndim",
        &l.entries.iter().map(|e| e.shape.len() as u64).collect::<Vec<_>>(),
        &[n],
    )?;
    p.u64s(
        "offset",
        &l.entries.iter().map(|e| e.offset as u64).collect::<Vec<_>>(),
        &[n],
    )?;
    p.u64s("len", &l.entries.iter().map(|e| e.len as u64).collect::<Vec<_>>(), &[n])?;
    p.texts("role", &roles)?;
    p.i64s(
        "block",
        &l.entries.iter().map(|e| role_name(&e.role).1).collect::<Vec<_>>(),
        &[n],
    )?;
    p.i64s(
        "axis",
        &l.entries.iter().map(|e| role_name(&e.role).2).collect::<Vec<_>>(),
        &[n],
    )?;
    p.attr_u64("total", l.total as u64)
}

fn get_layout(parent: &hdf5::Group, name: &str, path: &Path) -> Result<Layout> {
    let g = Get { group: parent, path }.subgroup(name)?;
    let get = Get { group: &g, path };
    let names = get.texts("name")?;
    let n = names.len();
    let shape = get.u64s("shape")?;
    let (ndim, offset, len) = (get.u64s("ndim")?, get.u64s("offset")?, get.u64s("len")?);
    let (roles, block, axis) = (get.texts("role")?, get.i64s("block")?, get.i64s("axis")?);
    let bad = |m: String| Error::format(path, format!("layout /{name}: {m}"));
    if [
        shape.len() / MAX_NDIM,
        ndim.len(),
        offset.len(),
        len.len(),
        roles.len(),
        block.len(),
        axis.len(),
    ]
    .iter()
    .any(|&k| k != n)
    {
        return Err(bad("its columns have different lengths".into()));
    }
    let mut l = Layout::default();
    for i in 0..n {
        let nd = ndim[i] as usize;
        if nd > MAX_NDIM {
            return Err(bad(format!("tensor {} has {nd} dimensions", names[i])));
        }
        let shp: Vec<usize> = shape[i * MAX_NDIM..i * MAX_NDIM + nd]
            .iter()
            .map(|&d| d as usize)
            .collect();
        let role = match roles[i].as_str() {
            "shared" => Role::Shared,
            "partitioned" if block[i] >= 0 && axis[i] >= 0 => Role::Partitioned {
                block: block[i] as usize,
                axis: axis[i] as usize,
            },
            r => return Err(bad(format!("tensor {} has an unknown role '{r}'", names[i]))),
        };
        let at = l.push(names[i].clone(), &shp, role);
        let e: &Entry = &l.entries[at];
        if e.offset as u64 != offset[i] || e.len as u64 != len[i] {
            return Err(bad(format!("tensor {} is not packed back to back", names[i])));
        }
    }
    if l.total as u64 != get.attr_u64("total")? {
        return Err(bad("its total does not match its entries".into()));
    }
    Ok(l)
}

/// Test hook: `LOFT_INJECT_CHECKPOINT_STALL=N` makes the N-th checkpoint write of this process
/// stop forever after its temporary file is complete and before the rename (so a test can
/// `kill -9` the writer at the worst moment).
fn stall_requested() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed) + 1;
    std::env::var("LOFT_INJECT_CHECKPOINT_STALL")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        == Some(n)
}

impl CheckpointOf<'_> {
    /// File name of the checkpoint taken after `step` optimizer steps.
    pub fn file_name(step: u64) -> String {
        format!("step-{step:09}.h5")
    }

    /// Write to `path` atomically: a hidden temporary file in the same directory, closed and
    /// fsynced, then renamed. On failure the temporary file is removed and `path` (or an
    /// older checkpoint) is untouched.
    pub fn write(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint.h5");
        let tmp = dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let result = self.write_file(&tmp).map_err(|e| match e {
            Error::Format { msg, .. } => Error::format(path, format!("{msg} (earlier checkpoints are kept)")),
            Error::Io { source, .. } => Error::format(
                path,
                format!("writing the checkpoint failed: {source} (earlier checkpoints are kept)"),
            ),
            e => e,
        });
        let result = result.and_then(|()| {
            let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
            if stall_requested() {
                eprintln!(
                    "loft: test hook: checkpoint {} written to {}, stalling before the rename",
                    path.display(),
                    tmp.display()
                );
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn write_file(&self, tmp: &Path) -> Result<()> {
        let werr = |e: hdf5::Error| Error::format(tmp, format!("writing the checkpoint failed: {}", one_line(&e)));
        let file = hdf5::File::with_options()
            .with_fcpl(|p| p.userblock(USERBLOCK as u64))
            .with_fapl(|p| p.libver_latest())
            .create(tmp)
            .map_err(werr)?;
        self.write_groups(&file).map_err(werr)?;
        file.close().map_err(werr)?;
        seal(tmp)
    }

    fn write_groups(&self, file: &hdf5::File) -> hdf5::Result<()> {
        let s = &self.state;
        let root = Put { group: file };
        root.attr_text("format", FORMAT_NAME)?;
        root.attr_u64("format_version", FORMAT_VERSION)?;
        root.attr_text("loft_version", env!("CARGO_PKG_VERSION"))?;
        root.attr_text("kind", self.kind.name())?;
        root.attr_text("method", self.method.name())?;
        for (k, v) in [("round", s.round), ("epoch", s.epoch), ("step", s.step)] {
            root.attr_u64(k, v)?;
        }
        root.attr_u64("workers", s.workers as u64)?;
        root.text("config", &self.config)?;
        root.text("state", &serde_json::to_string(s).expect("state serializes"))?;
        root.f32s("params", &self.params, &[self.params.len()])?;
        root.f32s("stats", &self.stats, &[self.stats.len()])?;
        root.f32s("momentum", &self.momentum, &[self.momentum.len()])?;
        let layout = file.create_group("layout")?;
        put_layout(&layout, "params", &self.param_layout)?;
        put_layout(&layout, "stats", &self.stat_layout)?;
        let rng = file.create_group("rng")?;
        let r = Put { group: &rng };
        r.attr_u64("seed", self.seed)?;
        r.attr_text(
            "algorithm",
            "xoshiro256** per stream, seeded by SplitMix64 from (seed, purpose, ids)",
        )?;
        r.u64s("data_position", &self.data_position, &[self.data_position.len()])?;
        if let Some(p) = &self.partition {
            let g = file.create_group("partition")?;
            let put = Put { group: &g };
            put.attr_u64("round", p.round)?;
            put.attr_u64("workers", p.owned.len() as u64)?;
            let mut owner = Vec::new();
            let mut widths = Vec::new();
            for i in 0..p.blocks.len() {
                let w: usize = p.owned.iter().map(|o| o[i].len()).sum();
                let mut own = vec![u64::MAX; w];
                for (rank, o) in p.owned.iter().enumerate() {
                    for &j in &o[i] {
                        own[j] = rank as u64;
                    }
                }
                owner.extend(own);
                widths.push(w as u64);
            }
            let blocks: Vec<u64> = p.blocks.iter().map(|&b| b as u64).collect();
            put.u64s("blocks", &blocks, &[blocks.len()])?;
            put.u64s("widths", &widths, &[widths.len()])?;
            put.u64s("owner", &owner, &[owner.len()])?;
        }
        let g = file.create_group("ledger")?;
        let table = ledger_table(&self.ledgers);
        Put { group: &g }.u64s("tally", &table, &[self.ledgers.len(), PURPOSES.len(), KINDS.len(), 3])?;
        if let Some(t) = &self.ticket {
            let g = file.create_group("ticket")?;
            let put = Put { group: &g };
            put.text("info", &serde_json::to_string(t).expect("ticket serializes"))?;
            let flat: Vec<u64> = t.kept.iter().flatten().map(|&j| j as u64).collect();
            let counts: Vec<u64> = t.kept.iter().map(|k| k.len() as u64).collect();
            put.u64s("kept", &flat, &[flat.len()])?;
            put.u64s("kept_counts", &counts, &[counts.len()])?;
            put.texts("blocks", &t.blocks)?;
        }
        if let Some(r) = &self.reference {
            let g = file.create_group("distance")?;
            let runs: Vec<(usize, &[f32])> = r.runs.iter().map(|(at, v)| (*at, &v[..])).collect();
            Put { group: &g }.f32s_runs("reference", r.len, &runs)?;
        }
        let g = file.create_group("log")?;
        Put { group: &g }.text("metrics", &self.metrics_log)
    }

    /// Read and check a checkpoint: format and version, every checksum, and the consistency
    /// of the buffers with their layouts. Errors name the file and the problem.
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(Error::format(path, "is a directory, not a checkpoint file"));
        }
        check_seal(path)?;
        let file = hdf5::File::open(path).map_err(|e| {
            Error::format(
                path,
                format!(
                    "not a readable HDF5 checkpoint (truncated or corrupted?): {}",
                    one_line(&e)
                ),
            )
        })?;
        let root = Get { group: &file, path };
        let format = root
            .attr_text("format")
            .map_err(|_| Error::format(path, "not a loft checkpoint (no 'format' attribute)"))?;
        if format != FORMAT_NAME {
            return Err(Error::format(
                path,
                format!("not a loft checkpoint (format '{format}')"),
            ));
        }
        let version = root.attr_u64("format_version")?;
        if version > FORMAT_VERSION {
            return Err(Error::format(
                path,
                format!(
                    "checkpoint format version {version} is newer than this loft reads (up to {FORMAT_VERSION}); use a newer loft"
                ),
            ));
        }
        let state: State = serde_json::from_str(&root.text("state")?)
            .map_err(|e| Error::format(path, format!("/state is not valid: {e}")))?;
        let config = root.text("config")?;
        serde_json::from_str::<serde_json::Value>(&config)
            .map_err(|e| Error::format(path, format!("/config is not valid JSON: {e}")))?;
        let Buffers {
            params,
            param_layout,
            stats,
            stat_layout,
            momentum,
        } = read_buffers(&file, path)?;
        let rng = root.subgroup("rng")?;
        let rget = Get { group: &rng, path };
        let seed = rget.attr_u64("seed")?;
        let data_position = rget.u64s("data_position")?;
        let partition = if file.link_exists("partition") {
            Some(read_partition(&root.subgroup("partition")?, path)?)
        } else {
            None
        };
        let lg = root.subgroup("ledger")?;
        let lget = Get { group: &lg, path };
        let shape = lget.shape("tally")?;
        if shape.len() != 4 || shape[1..] != [PURPOSES.len(), KINDS.len(), 3] {
            return Err(Error::format(path, format!("/ledger/tally has shape {shape:?}")));
        }
        let ledgers = ledgers_from_table(&lget.u64s("tally")?);
        let log = root.subgroup("log")?;
        let metrics_log = Get { group: &log, path }.text("metrics")?;
        let ticket = if file.link_exists("ticket") {
            let g = root.subgroup("ticket")?;
            let info: TicketInfo = serde_json::from_str(&Get { group: &g, path }.text("info")?)
                .map_err(|e| Error::format(path, format!("/ticket/info is not valid: {e}")))?;
            Some(info)
        } else {
            None
        };
        let reference = if file.link_exists("distance") {
            let g = root.subgroup("distance")?;
            let r = Get { group: &g, path }.f32s("reference")?;
            if r.len() != params.len() {
                return Err(Error::format(path, "/distance/reference does not match /params"));
            }
            Some(Reference {
                len: r.len(),
                runs: vec![(0, r.into())],
            })
        } else {
            None
        };
        let kind = root.attr_text("kind")?;
        let kind = CheckpointKind::parse(&kind)
            .ok_or_else(|| Error::format(path, format!("unknown checkpoint kind '{kind}'")))?;
        let method = match root.attr_text("method")?.as_str() {
            "loft" => Method::Loft,
            "dense" => Method::Dense,
            m => return Err(Error::format(path, format!("unknown method '{m}'"))),
        };
        Ok(Checkpoint {
            kind,
            method,
            config,
            state,
            seed,
            params: params.into(),
            param_layout,
            stats: stats.into(),
            stat_layout,
            momentum: momentum.into(),
            data_position,
            partition,
            ledgers,
            metrics_log,
            ticket,
            reference,
        })
    }
}
/// The flat buffers of a checkpoint with their layouts.
struct Buffers {
    params: Vec<f32>,
    param_layout: Layout,
    stats: Vec<f32>,
    stat_layout: Layout,
    momentum: Vec<f32>,
}

/// `/params`, `/stats`, `/momentum` and `/layout`, checked against each other.
fn read_buffers(file: &hdf5::File, path: &Path) -> Result<Buffers> {
    let root = Get { group: file, path };
    let layout = root.subgroup("layout")?;
    let param_layout = get_layout(&layout, "params", path)?;
    let stat_layout = get_layout(&layout, "stats", path)?;
    let params = root.f32s("params")?;
    let stats = root.f32s("stats")?;
    let momentum = root.f32s("momentum")?;
    if params.len() != param_layout.total || momentum.len() != param_layout.total {
        return Err(Error::format(
            path,
            format!(
                "/params has {} and /momentum {} values but the layout holds {}",
                params.len(),
                momentum.len(),
                param_layout.total
            ),
        ));
    }
    if stats.len() != stat_layout.total {
        return Err(Error::format(
            path,
            format!(
                "/stats has {} values but its layout holds {}",
                stats.len(),
                stat_layout.total
            ),
        ));
    }
    Ok(Buffers {
        params,
        param_layout,
        stats,
        stat_layout,
        momentum,
    })
}

/// The `/partition` group: owner rank of every inner filter of every partitioned block.
fn read_partition(g: &hdf5::Group, path: &Path) -> Result<Partition> {
    let get = Get { group: g, path };
    let workers = get.attr_u64("workers")? as usize;
    let blocks = get.u64s("blocks")?;
    let widths = get.u64s("widths")?;
    let owner = get.u64s("owner")?;
    if widths.len() != blocks.len() || widths.iter().sum::<u64>() as usize != owner.len() {
        return Err(Error::format(path, "/partition: blocks, widths and owners disagree"));
    }
    let mut owned = vec![vec![Vec::new(); blocks.len()]; workers];
    let mut at = 0;
    for (i, &w) in widths.iter().enumerate() {
        for j in 0..w as usize {
            let r = owner[at + j] as usize;
            if r >= workers {
                return Err(Error::format(path, "/partition: an owner rank is out of range"));
            }
            owned[r][i].push(j);
        }
        at += w as usize;
    }
    Ok(Partition {
        round: get.attr_u64("round")?,
        blocks: blocks.iter().map(|&b| b as usize).collect(),
        owned,
    })
}

/// Bytes reserved before the HDF5 data (an HDF5 user block, which HDF5 and h5py skip). It
/// holds one line, `LOFT-CHECKPOINT <version> crc32=<8 hex> bytes=<n>`, zero-padded: the
/// CRC-32 and length of everything after it, so any changed or missing byte is detected
/// before HDF5 parses the file.
pub const USERBLOCK: usize = 512;
const SEAL_TAG: &str = "LOFT-CHECKPOINT";

/// CRC-32 and length of the file after the user block.
fn body_crc(path: &Path) -> Result<(u32, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::Start(USERBLOCK as u64))
        .map_err(|e| Error::io(path, e))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize(), n))
}

/// Write the seal line into the user block of a closed checkpoint file.
fn seal(path: &Path) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let (crc, n) = body_crc(path)?;
    let mut line = format!("{SEAL_TAG} {FORMAT_VERSION} crc32={crc:08x} bytes={n}\n").into_bytes();
    line.resize(USERBLOCK, 0);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(path, e))?;
    f.write_all(&line).map_err(|e| Error::io(path, e))
}

/// Check the seal: the file is a loft checkpoint, complete and unchanged since it was written.
fn check_seal(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = vec![0u8; USERBLOCK];
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let got = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    if head.starts_with(b"\x89HDF") {
        return Err(Error::format(
            path,
            "an HDF5 file, but not a loft checkpoint (no loft header)",
        ));
    }
    if !head[..got].starts_with(SEAL_TAG.as_bytes()) {
        return Err(Error::format(
            path,
            "not a loft checkpoint (no loft header; empty, truncated or another kind of file?)",
        ));
    }
    let damaged = || Error::format(path, "the checkpoint header is damaged");
    let end = head.iter().position(|&b| b == b'\n').ok_or_else(damaged)?;
    if got < USERBLOCK || head[end + 1..].iter().any(|&b| b != 0) {
        return Err(damaged());
    }
    let line = std::str::from_utf8(&head[..end]).map_err(|_| damaged())?;
    let fields: Vec<&str> = line.split(' ').skip(1).collect();
    let parsed = (|| {
        let version: u64 = fields.first()?.parse().ok()?;
        let crc = u32::from_str_radix(fields.get(1)?.strip_prefix("crc32=")?, 16).ok()?;
        let bytes: u64 = fields.get(2)?.strip_prefix("bytes=")?.parse().ok()?;
        Some((version, crc, bytes))
    })();
    let Some((version, crc, bytes)) = parsed else {
        return Err(damaged());
    };
    if version > FORMAT_VERSION {
        return Err(Error::format(
            path,
            format!("checkpoint format version {version} is newer than this loft reads (up to {FORMAT_VERSION}); use a newer loft"),
        ));
    }
    let (have_crc, have_bytes) = body_crc(path)?;
    if have_bytes != bytes {
        return Err(Error::format(
            path,
            format!(
                "the checkpoint is truncated or extended: {} bytes, expected {}",
                have_bytes + USERBLOCK as u64,
                bytes + USERBLOCK as u64
            ),
        ));
    }
    if have_crc != crc {
        return Err(Error::format(
            path,
            format!("the checkpoint is corrupted: file checksum {have_crc:08x}, expected {crc:08x}"),
        ));
    }
    Ok(())
}

/// An HDF5 error as one line.
fn one_line(e: &hdf5::Error) -> String {
    let text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    // HDF5's I/O errors carry a long trailer; keep the cause and the system's message
    match (text.find(": time ="), text.find("error message = '")) {
        (Some(cut), Some(m)) => {
            let msg = &text[m + 17..];
            format!("{}: {}", &text[..cut], msg.split('\'').next().unwrap_or(msg))
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_table_round_trips() {
        let mut a = Ledger::default();
        a.record(Purpose::Sync, Kind::Allreduce, 10, 12);
        a.record(Purpose::Sync, Kind::Allreduce, 10, 12);
        a.record(Purpose::Metrics, Kind::Allgather, 8, 8);
        let b = Ledger::default();
        let t = ledger_table(&[a.clone(), b.clone()]);
        assert_eq!(t.len(), 2 * 4 * 4 * 3);
        assert_eq!(ledgers_from_table(&t), vec![a, b]);
    }
}
