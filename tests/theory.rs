//! `loft theory` on a reduced sweep (widths 2^6 .. 2^10, two seeds): LoFT's predictions
//! approach gradient descent's as the width grows (the fitted slope of the summed prediction
//! gap against the width is clearly negative), and the outputs are written.

mod common;

use common::ok;
use std::process::Command;

#[test]
fn the_prediction_gap_to_gradient_descent_shrinks_with_the_width() {
    let data = "/usr/share/datasets/fashion-mnist";
    if !std::path::Path::new(data).is_dir() {
        assert!(
            std::env::var_os("LOFT_REQUIRE_DATA").is_none(),
            "Fashion-MNIST is required (make deps)"
        );
        return;
    }
    let out = std::env::temp_dir().join(format!("loft-theory-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_loft"))
        .args([
            "theory",
            "--widths",
            "6..10",
            "--seeds",
            "2",
            "--steps",
            "32",
            "--samples",
            "32",
            "--lr",
            "0.01",
        ])
        .args(["--progress", "none", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&o);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("theory.json")).unwrap()).unwrap();
    let slopes = r["slopes"].as_array().unwrap();
    assert_eq!(slopes.len(), 2);
    for s in slopes {
        let gap = &s[2];
        let (slope, hi) = (gap["slope"].as_f64().unwrap(), gap["hi"].as_f64().unwrap());
        // about -1 here; the whole 95% interval below zero
        assert!(
            slope < -0.5 && hi < 0.0,
            "S = {}: prediction-gap slope {slope} (upper bound {hi})",
            s[0]
        );
    }
    assert_eq!(r["runs"].as_array().unwrap().len(), 5 * 2 * 2);
    for f in ["theory.md", "theory.png", "theory-loss.png"] {
        assert!(std::fs::metadata(out.join(f)).unwrap().len() > 100, "{f}");
    }
    let e = Command::new(env!("CARGO_BIN_EXE_loft"))
        .args(["theory", "--widths", "9"])
        .output()
        .unwrap();
    common::one_line_error(&e, "--widths 9");
}
