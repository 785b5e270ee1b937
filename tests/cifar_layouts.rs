//! CIFAR in both layouts users keep: the binary version and torchvision's pickled batches
//! (written here by Python with numpy, as Python 2 and Python 3 pickles do: byte-string keys
//! at protocol 2, text keys at protocol 4). Both must give identical tensors, and a folder
//! holding neither is a one-line error that names both layouts.

mod common;

use common::{ok, one_line_error};
use loft::data::cifar::{load_cifar10, load_cifar100};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-cifar-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Write the same random CIFAR-10 and CIFAR-100 sets in both layouts under `root`.
const WRITE: &str = r#"
import os, pickle, sys
import numpy as np
root, protocol, text_keys = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "text"
rng = np.random.default_rng(7)
key = (lambda k: k) if text_keys else (lambda k: k.encode())
def batch(n, classes, fine):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, classes, size=n)]
    return data, labels
def both(binary, py, name, n, classes, hundred):
    data, labels = batch(n, classes, hundred)
    with open(os.path.join(binary, name + ".bin"), "wb") as f:
        for row, l in zip(data, labels):
            f.write(bytes([l // 5 % 20, l] if hundred else [l]) + row.tobytes())
    d = {key("data"): data, key("filenames"): [key(f"img{i}.png") for i in range(n)]}
    if hundred:
        d[key("fine_labels")] = labels
        d[key("coarse_labels")] = [l // 5 for l in labels]
    else:
        d[key("labels")] = labels
        d[key("batch_label")] = key(name)
    with open(os.path.join(py, name), "wb") as f:
        pickle.dump(d, f, protocol=protocol)
for sub in ("c10-bin", "c10-py", "c100-bin", "c100-py"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
for i in range(1, 6):
    both(os.path.join(root, "c10-bin"), os.path.join(root, "c10-py"), f"data_batch_{i}", 7, 10, False)
both(os.path.join(root, "c10-bin"), os.path.join(root, "c10-py"), "test_batch", 5, 10, False)
both(os.path.join(root, "c100-bin"), os.path.join(root, "c100-py"), "train", 9, 100, True)
both(os.path.join(root, "c100-bin"), os.path.join(root, "c100-py"), "test", 4, 100, True)
"#;

fn write(root: &Path, protocol: &str, keys: &str) -> bool {
    let o = Command::new("/usr/bin/python3")
        .args(["-c", WRITE, root.to_str().unwrap(), protocol, keys])
        .output();
    match o {
        Ok(o) if o.status.success() => true,
        _ if std::env::var_os("LOFT_REQUIRE_DATA").is_some() => {
            panic!("python3 with numpy is required (make deps installs python3-h5py, which brings numpy)")
        }
        _ => {
            eprintln!("note: python3 with numpy not found; skipping");
            false
        }
    }
}

#[test]
fn both_layouts_give_identical_tensors() {
    for (protocol, keys) in [("2", "bytes"), ("4", "text")] {
        let root = tmp(&format!("p{protocol}"));
        if !write(&root, protocol, keys) {
            return;
        }
        let (b, p) = (
            load_cifar10(&root.join("c10-bin")).unwrap(),
            load_cifar10(&root.join("c10-py")).unwrap(),
        );
        assert_eq!(b.train.len(), 35);
        assert_eq!(b.test.len(), 5);
        for (x, y) in [(&b.train, &p.train), (&b.test, &p.test)] {
            assert_eq!(x.pixels, y.pixels, "protocol {protocol}: CIFAR-10 pixels");
            assert_eq!(x.labels, y.labels, "protocol {protocol}: CIFAR-10 labels");
            assert_eq!((x.classes, x.name.as_str()), (y.classes, y.name.as_str()));
        }
        let (b, p) = (
            load_cifar100(&root.join("c100-bin")).unwrap(),
            load_cifar100(&root.join("c100-py")).unwrap(),
        );
        assert_eq!((b.train.len(), b.test.len(), b.train.classes), (9, 4, 100));
        assert_eq!(b.train.pixels, p.train.pixels);
        assert_eq!(b.train.labels, p.train.labels, "fine labels");
        assert_eq!(b.test.labels, p.test.labels);
    }
}

#[test]
fn the_command_line_reads_torchvisions_layout_and_names_both_when_neither_is_there() {
    let root = tmp("cli");
    if !write(&root, "2", "bytes") {
        return;
    }
    let loft = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_loft")).args(args).output().unwrap();
    let py = root.join("c10-py");
    let out = root.join("run");
    ok(&loft(&[
        "--threads",
        "1",
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        py.to_str().unwrap(),
        "--base-width",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--progress",
        "none",
        "--out",
        out.to_str().unwrap(),
    ]));
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = loft(&[
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        empty.to_str().unwrap(),
        "--progress",
        "none",
    ]);
    one_line_error(&o, "cifar-10-batches-py");
    one_line_error(&o, "binary version");
    // a corrupt pickle names the file
    std::fs::write(py.join("data_batch_3"), b"\x80\x02not a pickle").unwrap();
    let o = loft(&[
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        py.to_str().unwrap(),
        "--progress",
        "none",
    ]);
    one_line_error(&o, "data_batch_3");
}
