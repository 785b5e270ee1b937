//! ImageNet in its folder layout, on a small tree of generated images (written by Pillow):
//! JPEGs of several sizes, a grey one, a CMYK one and a PNG saved under a .JPEG name all
//! decode to RGB; classes are the sorted folder names; the main job runs through the tree on
//! two ranks; an undecodable file is a one-line error that names it.

mod common;

use common::{have_mpirun, mpirun_loft, ok, one_line_error};
use loft::data::imagenet::{self, Folder};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-imagenet-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// train/<3 classes>/ and val/<3 classes>/ with awkward files in train/n02.
const WRITE: &str = r#"
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]
rng = np.random.default_rng(1)
sizes = [(500, 375), (375, 500), (64, 48), (300, 300)]
def img(cls, k, size):
    w, h = size
    base = np.array([[60, 120, 200], [200, 80, 40], [40, 200, 90]][cls], np.float64)
    noise = rng.normal(0, 30, size=(h, w, 3))
    grad = np.linspace(-40, 40, w)[None, :, None]
    return Image.fromarray(np.clip(base + noise + grad, 0, 255).astype(np.uint8), "RGB")
for half, per_class in (("train", 8), ("val", 3)):
    for cls, name in enumerate(["n03", "n01", "n02"]):  # sorted: n01 n02 n03
        d = os.path.join(root, half, name)
        os.makedirs(d, exist_ok=True)
        for k in range(per_class):
            img(cls, k, sizes[k % len(sizes)]).save(os.path.join(d, f"{name}_{k}.JPEG"), quality=90)
odd = os.path.join(root, "train", "n02")
img(2, 0, (200, 150)).convert("L").save(os.path.join(odd, "grey.JPEG"))
img(2, 1, (180, 240)).convert("CMYK").save(os.path.join(odd, "cmyk.JPEG"))
img(2, 2, (120, 90)).save(os.path.join(odd, "png_inside.JPEG"), format="PNG")
open(os.path.join(odd, "notes.txt"), "w").write("not an image")
"#;

fn generate(root: &Path) -> bool {
    let o = Command::new("/usr/bin/python3")
        .env("PYTHONPATH", concat!(env!("CARGO_MANIFEST_DIR"), "/.deps/python"))
        .args(["-c", WRITE, root.to_str().unwrap()])
        .output();
    match o {
        Ok(o) if o.status.success() => true,
        _ if std::env::var_os("LOFT_REQUIRE_DATA").is_some() => {
            panic!("python3 with numpy and Pillow is required (make deps installs them): {o:?}")
        }
        _ => {
            eprintln!("note: Pillow for python3 not installed; skipping (make deps)");
            false
        }
    }
}

#[test]
fn the_folder_layout_decodes_every_kind_of_file_to_rgb() {
    let root = tmp("decode");
    if !generate(&root) {
        return;
    }
    let train = Folder::scan(&root.join("train")).unwrap();
    assert_eq!(train.classes, ["n01", "n02", "n03"]);
    assert_eq!(train.files.len(), 3 * 8 + 3, "the .txt file is not an image");
    let label_of = |name: &str| train.files.iter().find(|(p, _)| p.ends_with(name)).unwrap().1;
    assert_eq!(label_of("n01/n01_0.JPEG"), 0);
    assert_eq!(label_of("n03/n03_5.JPEG"), 2);
    for (f, size) in [
        ("n02/grey.JPEG", (200, 150)),
        ("n02/cmyk.JPEG", (180, 240)),
        ("n02/png_inside.JPEG", (120, 90)),
        ("n01/n01_1.JPEG", (375, 500)),
    ] {
        let (px, w, h) = imagenet::decode(&root.join("train").join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!((w, h), size, "{f}");
        assert_eq!(px.len(), w * h * 3, "{f}");
    }
    // the grey image is grey in all three channels
    let (px, _, _) = imagenet::decode(&root.join("train/n02/grey.JPEG")).unwrap();
    assert!(px.chunks_exact(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    // and the loader turns the set into normalised 3x224x224 batches
    let split = loft::data::load(&loft::data::DatasetKind::Imagenet, &root).unwrap();
    assert_eq!((split.train.len(), split.test.len(), split.train.classes), (27, 9, 3));
    let (mean, std) = split.train.channel_stats();
    let aug = loft::data::DatasetKind::Imagenet.default_augment();
    let l = loft::data::Loader::new(&split.train, 4, mean, std, aug, true, false, 3, 0);
    let order = l.order(0);
    let (mut x, mut y) = (vec![0f32; 4 * 3 * 224 * 224], vec![0u32; 4]);
    let mut first = Vec::new();
    for b in 0..l.batches_per_epoch() {
        let n = l.fill(&order, 0, b, &mut x, &mut y).unwrap();
        assert!(n > 0 && x[..n * 3 * 224 * 224].iter().all(|v| v.is_finite() && v.abs() < 5.0));
        if b == 0 {
            first = x.clone();
        }
    }
    // the same batch again (decoded now, not prefetched): the same values
    let (mean, std) = split.train.channel_stats();
    let l2 = loft::data::Loader::new(&split.train, 4, mean, std, aug, true, false, 3, 0);
    l2.fill(&order, 0, 0, &mut x, &mut y).unwrap();
    assert_eq!(first, x);
}

#[test]
fn the_main_job_runs_through_an_imagenet_tree_on_two_ranks() {
    let root = tmp("run");
    if !generate(&root) {
        return;
    }
    if !have_mpirun() {
        return;
    }
    let out = root.join("job");
    let o = mpirun_loft(
        2,
        &[
            "--threads",
            "1",
            "run",
            "--dataset",
            "imagenet",
            "--data-dir",
            root.to_str().unwrap(),
            "--base-width",
            "2",
            "--rounds",
            "2",
            "--local-steps",
            "1",
            "--batch-size",
            "4",
            "--finetune-epochs",
            "1",
            "--record-every",
            "1",
            "--ratios",
            "0.5",
            "--progress",
            "none",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    ok(&o);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("imagenet"), "{report}");
    // the network had the ImageNet stem and 1000 classes, implied by the data set
    for run in ["pretrain-dense", "pretrain-loft"] {
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join(run).join("config.json")).unwrap()).unwrap();
        let arch = &cfg["config"]["arch"];
        assert_eq!(
            (arch["stem"].as_str(), arch["classes"].as_u64()),
            (Some("Imagenet"), Some(1000)),
            "{arch}"
        );
    }
}

#[test]
fn an_undecodable_image_is_a_one_line_error_naming_it() {
    let root = tmp("corrupt");
    if !generate(&root) {
        return;
    }
    let bad = root.join("val/n01/n01_1.JPEG");
    std::fs::write(&bad, b"\xff\xd8\xff\xe0 this is not a JPEG").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_loft"))
        .args([
            "--threads",
            "1",
            "train",
            "--dataset",
            "imagenet",
            "--data-dir",
            root.to_str().unwrap(),
            "--base-width",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--progress",
            "none",
            "--out",
            root.join("out").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    one_line_error(&o, "n01_1.JPEG");
    // a folder without train/ and val/ says what it expects
    let o = Command::new(env!("CARGO_BIN_EXE_loft"))
        .args([
            "train",
            "--dataset",
            "imagenet",
            "--data-dir",
            root.join("val").to_str().unwrap(),
            "--progress",
            "none",
        ])
        .output()
        .unwrap();
    one_line_error(&o, "DIR/train/<class>/*.JPEG");
}

#[test]
fn a_run_on_image_folders_resumes_from_a_checkpoint_exactly() {
    let root = tmp("resume");
    if !generate(&root) {
        return;
    }
    let loft = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_loft")).args(args).output().unwrap();
    let train = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "--threads",
            "1",
            "train",
            "--dataset",
            "imagenet",
            "--data-dir",
            root.to_str().unwrap(),
            "--base-width",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--progress",
            "none",
            "--checkpoint-every",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        loft(&a)
    };
    let whole = root.join("whole");
    ok(&train(&whole, &[]));
    let first = loft::checkpoint::list(&whole.join("checkpoints")).unwrap()[0].1.clone();
    let resumed = root.join("resumed");
    ok(&loft(&[
        "--threads",
        "1",
        "train",
        "--resume",
        first.to_str().unwrap(),
        "--progress",
        "none",
        "--out",
        resumed.to_str().unwrap(),
    ]));
    assert_eq!(
        common::metrics_without_timings(&resumed),
        common::metrics_without_timings(&whole)
    );
}
