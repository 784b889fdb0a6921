//! The segmented attention kernels on the kernel emulator, against the CPU oracle.

mod common;

use ape_attn::cuda::{DType, SegmentedAttentionOptions};
use ape_attn::emulator::{self, EmulatorOptions};
use ape_attn::reference::{self, rel_l2};
use ape_attn::{ApeParams, AttentionDims, SegmentRole};
use common::seeded;

#[test]
fn smoke() {
    let mut r = seeded("smoke");
    let dims = AttentionDims::new(8, 2, 128).unwrap();
    let row = dims.n_kv_heads * dims.head_dim;
    let dtype = DType::BF16;
    let round = |x: Vec<f32>| x.into_iter().map(|v| dtype.round(v)).collect::<Vec<_>>();
    let (lc, lo, n_rows) = (100, 20, 20);
    let ck = round(r.uniform(lc * row, 2.0));
    let cv = round(r.uniform(lc * row, 1.0));
    let ok = round(r.uniform(lo * row, 2.0));
    let ov = round(r.uniform(lo * row, 1.0));
    let q = round(r.uniform(n_rows * dims.n_heads * dims.head_dim, 2.0));
    let segs = [
        reference::Segment {
            k: &ck,
            v: &cv,
            len: lc,
            pos_offset: 0,
            role: SegmentRole::Context,
            rope_shift: None,
        },
        reference::Segment {
            k: &ok,
            v: &ov,
            len: lo,
            pos_offset: 100,
            role: SegmentRole::Causal,
            rope_shift: None,
        },
    ];
    let query = reference::Query {
        data: &q,
        n_rows,
        pos_offset: 100,
    };
    let ape = ApeParams::default();
    let want = reference::segmented_attention(&query, &segs, &dims, &ape).unwrap();
    for splits in [Some(1), None] {
        for opts in EmulatorOptions::default().schedules() {
            let t = std::time::Instant::now();
            let got = emulator::segmented_attention(
                dtype,
                &query,
                &segs,
                &dims,
                &ape,
                &SegmentedAttentionOptions { num_splits: splits },
                &opts,
            )
            .unwrap();
            let lse_err = got
                .lse
                .iter()
                .zip(&want.lse)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!(
                "{splits:?} {opts:?}: rel_l2 {:.2e} lse {:.2e} in {:?}",
                rel_l2(&got.out, &want.out),
                lse_err,
                t.elapsed()
            );
        }
    }
}
