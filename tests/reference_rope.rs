//! The CPU oracle's RoPE: apply and shift, both layouts, Llama 3 scaling.

mod common;

use ape_attn::reference::rope::{apply, shift};
use ape_attn::{Error, Llama3RopeScaling, RopeConfig, RopeLayout};
use common::{max_abs_diff, random_rope, seeded, Seeded, LLAMA31};

fn random_config(r: &mut Seeded) -> RopeConfig {
    let head_dim = r.pick(&[2, 8, 64, 128]);
    random_rope(r, head_dim)
}

/// R(a) R(b) = R(a + b): applying at positions `a + t` then shifting by `b` equals applying at
/// `a + b + t`. With a = 0 this is Block-Attention's re-encoding: a key cached at position `t` and
/// shifted by the block offset `b` equals the key computed at its real position `b + t`.
#[test]
fn rotations_compose_and_shifted_keys_equal_keys_at_the_new_position() {
    let mut r = seeded("rotations_compose_and_shifted_keys_equal_keys_at_the_new_position");
    for _ in 0..100 {
        let cfg = random_config(&mut r);
        let (n_tokens, n_heads) = (r.range(1, 6), r.range(1, 4));
        let x = r.uniform(n_tokens * n_heads * cfg.head_dim, 2.0);
        let a = if r.coin() { 0 } else { r.range(0, 5000) as i64 };
        let b = r.range(0, 70_000) as i64;

        let mut cached = x.clone();
        apply(&mut cached, n_tokens, n_heads, &cfg, a).expect("valid");
        shift(&mut cached, n_tokens, n_heads, &cfg, b).expect("valid");
        let mut direct = x.clone();
        apply(&mut direct, n_tokens, n_heads, &cfg, a + b).expect("valid");
        // Two f32 roundings against one: a few ulps of values up to ~3.
        assert!(max_abs_diff(&cached, &direct) < 2e-6, "a={a} b={b} {cfg:?}");

        // Shifting back by -(a+b) leaves token t at position t.
        shift(&mut direct, n_tokens, n_heads, &cfg, -(a + b)).expect("valid");
        let mut at_zero = x.clone();
        apply(&mut at_zero, n_tokens, n_heads, &cfg, 0).expect("valid");
        assert!(max_abs_diff(&direct, &at_zero) < 2e-6);
    }
}

#[test]
fn rotation_preserves_each_pair_norm() {
    let mut r = seeded("rotation_preserves_each_pair_norm");
    for _ in 0..50 {
        let cfg = random_config(&mut r);
        let x = r.uniform(cfg.head_dim, 2.0);
        let mut y = x.clone();
        apply(&mut y, 1, 1, &cfg, r.range(0, 100_000) as i64).expect("valid");
        for i in 0..cfg.head_dim / 2 {
            let (a, b) = cfg.pair(i);
            let before = x[a].hypot(x[b]);
            let after = y[a].hypot(y[b]);
            assert!((before - after).abs() < 1e-5);
        }
    }
}

/// The layouts differ only by a permutation of lanes: NeoX lane i and i + d/2 are interleaved
/// lanes 2i and 2i + 1.
#[test]
fn neox_and_interleaved_differ_by_a_lane_permutation() {
    let mut r = seeded("neox_and_interleaved_differ_by_a_lane_permutation");
    for _ in 0..50 {
        let mut cfg = random_config(&mut r);
        let d = cfg.head_dim;
        let x = r.uniform(d, 2.0);
        let pos = r.range(0, 10_000) as i64;
        cfg.layout = RopeLayout::Neox;
        let mut neox = x.clone();
        apply(&mut neox, 1, 1, &cfg, pos).expect("valid");
        let perm = |v: &[f32]| -> Vec<f32> {
            let mut p = vec![0.0; d];
            for i in 0..d / 2 {
                p[2 * i] = v[i];
                p[2 * i + 1] = v[i + d / 2];
            }
            p
        };
        cfg.layout = RopeLayout::Interleaved;
        let mut inter = perm(&x);
        apply(&mut inter, 1, 1, &cfg, pos).expect("valid");
        assert_eq!(inter, perm(&neox));
    }
}

#[test]
fn hand_computed_rotations() {
    // head_dim 2: theta_0 = base^0 = 1, so position 1 rotates (1, 0) by 1 radian.
    let cfg = RopeConfig::new(2, 10_000.0, RopeLayout::Neox).expect("valid");
    let mut x = [1.0f32, 0.0];
    apply(&mut x, 1, 1, &cfg, 1).expect("valid");
    assert!((x[0] - 0.540_302_3).abs() < 1e-7 && (x[1] - 0.841_470_96).abs() < 1e-7);

    // head_dim 4, base 100: theta = [1, 100^(-1/2) = 0.1]; position 2 gives angles 2 and 0.2.
    // NeoX pairs (0,2), (1,3); interleaved pairs (0,1), (2,3).
    let (c2, s2, c02, s02) = (
        -0.416_146_84f32,
        0.909_297_4f32,
        0.980_066_6f32,
        0.198_669_33f32,
    );
    let neox = RopeConfig::new(4, 100.0, RopeLayout::Neox).expect("valid");
    let mut x = [1.0f32, 0.0, 0.0, 1.0];
    apply(&mut x, 1, 1, &neox, 2).expect("valid");
    let want = [c2, -s02, s2, c02];
    assert!(max_abs_diff(&x, &want) < 1e-7, "{x:?}");
    let inter = RopeConfig {
        layout: RopeLayout::Interleaved,
        ..neox
    };
    let mut x = [1.0f32, 0.0, 0.0, 1.0];
    apply(&mut x, 1, 1, &inter, 2).expect("valid");
    let want = [c2, s2, -s02, c02];
    assert!(max_abs_diff(&x, &want) < 1e-7, "{x:?}");
}

#[test]
fn hand_computed_llama3_scaling() {
    use std::f64::consts::PI;
    // Llama 3.1: w_hi = 8192/4 = 2048, w_lo = 8192/1 = 8192.
    // Wavelength 2*pi (< 2048): kept.
    assert_eq!(LLAMA31.scale_frequency(1.0), 1.0);
    // Wavelength 10000 (> 8192): divided by 8.
    let theta = 2.0 * PI / 10_000.0;
    assert!((LLAMA31.scale_frequency(theta) - theta / 8.0).abs() < 1e-15);
    // Wavelength 4096: t = (8192/4096 - 1) / (4 - 1) = 1/3, theta' = (2/3) theta/8 + (1/3) theta
    // = theta * 5/12.
    let theta = 2.0 * PI / 4096.0;
    assert!((LLAMA31.scale_frequency(theta) - theta * 5.0 / 12.0).abs() < 1e-15);

    // inv_freqs applies it: the first frequency (theta_0 = 1) is kept, the last one is scaled.
    let cfg = RopeConfig::new(128, 500_000.0, RopeLayout::Neox)
        .and_then(|c| c.with_llama3_scaling(LLAMA31))
        .expect("valid");
    let plain = RopeConfig {
        llama3_scaling: None,
        ..cfg
    }
    .inv_freqs();
    let scaled = cfg.inv_freqs();
    assert_eq!(scaled[0], plain[0]);
    assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-18);
}

#[test]
fn invalid_rope_inputs_are_errors() {
    assert!(matches!(
        RopeConfig::new(7, 10_000.0, RopeLayout::Neox),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        RopeConfig::new(0, 10_000.0, RopeLayout::Neox),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        RopeConfig::new(64, f64::NAN, RopeLayout::Neox),
        Err(Error::InvalidParameter { .. })
    ));
    assert!(matches!(
        RopeConfig::new(64, -1.0, RopeLayout::Neox),
        Err(Error::InvalidParameter { .. })
    ));
    let cfg = RopeConfig::new(64, 10_000.0, RopeLayout::Neox).expect("valid");
    let inverted = Llama3RopeScaling {
        low_freq_factor: 4.0,
        high_freq_factor: 1.0,
        ..LLAMA31
    };
    assert!(cfg.with_llama3_scaling(inverted).is_err());
    let zero = Llama3RopeScaling {
        factor: 0.0,
        ..LLAMA31
    };
    assert!(cfg.with_llama3_scaling(zero).is_err());
    let mut x = vec![0.0f32; 64 * 3];
    assert!(apply(&mut x, 2, 1, &cfg, 0).is_err());
    assert!(shift(&mut x, 1, 2, &cfg, 5).is_err());
    assert!(apply(&mut x, 3, 1, &cfg, 0).is_ok());
}
