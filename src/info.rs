//! `loft info`: the layer table of an architecture and its shared / partitioned counts.

use crate::model::{Graph, Op, Role};
use serde_json::json;

/// The layer table as text: one row per parameter tensor, then the totals.
pub fn table(g: &Graph) -> String {
    let mut out = String::new();
    let s = &g.spec;
    out.push_str(&format!(
        "{} (base width {}, inner width x{}, {} stem, {} input channels, {} classes), input {}x{}\n\n",
        s.name(),
        s.base_width,
        s.inner_width,
        s.stem.name(),
        s.in_channels,
        s.classes,
        g.tensors[g.input].h,
        g.tensors[g.input].w
    ));
    out.push_str(&format!(
        "{:<24} {:<20} {:>12}  {:<8} {}\n",
        "tensor", "shape", "params", "role", "output (c x h x w)"
    ));
    for (i, e) in g.params.entries.iter().enumerate() {
        let role = match e.role {
            Role::Shared => "shared".to_string(),
            Role::Partitioned { block, axis } => format!("part b{block} axis {axis}"),
        };
        let shape = e.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let output = g
            .ops
            .iter()
            .find_map(|op| match op {
                Op::Conv { w, y, .. } | Op::Linear { w, y, .. } if *w == i => {
                    let t = &g.tensors[*y];
                    Some(format!("{}x{}x{}", t.c, t.h, t.w))
                }
                _ => None,
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<24} {:<20} {:>12}  {:<8} {}\n",
            e.name,
            shape,
            group(e.len),
            role,
            output
        ));
    }
    let (sh, pa) = g.param_counts();
    out.push_str(&format!(
        "\nshared      {:>14}\npartitioned {:>14}\ntotal       {:>14}\nblocks {} ({} partitioned, {} prunable), forward {:.3} GFLOP per sample\n",
        group(sh),
        group(pa),
        group(sh + pa),
        g.blocks.len(),
        g.blocks.iter().filter(|b| b.partitioned).count(),
        g.blocks.iter().filter(|b| b.prunable).count(),
        g.flops_per_sample() / 1e9
    ));
    out
}

/// The same as JSON.
pub fn json(g: &Graph) -> serde_json::Value {
    let (sh, pa) = g.param_counts();
    json!({
        "arch": g.spec,
        "input": { "h": g.tensors[g.input].h, "w": g.tensors[g.input].w },
        "params": g.params.entries,
        "stats": g.stats.entries,
        "blocks": g.blocks,
        "shared": sh,
        "partitioned": pa,
        "total": sh + pa,
        "forward_flops_per_sample": g.flops_per_sample(),
    })
}

/// 1234567 -> "1,234,567".
pub fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn group_inserts_commas() {
        assert_eq!(super::group(9_922_122), "9,922,122");
        assert_eq!(super::group(12), "12");
        assert_eq!(super::group(123_456), "123,456");
    }
}
