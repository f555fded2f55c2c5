//! Skippable units of the decoder: a whole layer, or one of its two residual blocks. The
//! vocabulary of layer plans, calibration profiles and the model's cost accounting; it depends
//! on nothing above the error type.

use crate::error::{ModelError, Result};
use serde::{Deserialize, Serialize};

/// One skippable unit of the decoder: a whole layer, or one of its two residual blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// The whole layer `l` (both blocks).
    Layer(usize),
    /// The attention block of layer `l` (its input norm, q/k/v/o projections and KV cache).
    Attn(usize),
    /// The MLP block of layer `l` (its post-attention norm, gate/up/down projections).
    Mlp(usize),
}

impl Unit {
    /// The layer the unit belongs to.
    pub fn layer(self) -> usize {
        match self {
            Unit::Layer(l) | Unit::Attn(l) | Unit::Mlp(l) => l,
        }
    }

    /// Every unit of a model with `num_layers` layers: the layers, then the attention blocks,
    /// then the MLP blocks.
    pub fn all(num_layers: usize) -> Vec<Unit> {
        (0..num_layers)
            .map(Unit::Layer)
            .chain((0..num_layers).map(Unit::Attn))
            .chain((0..num_layers).map(Unit::Mlp))
            .collect()
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Layer(l) => write!(f, "{l}"),
            Unit::Attn(l) => write!(f, "a{l}"),
            Unit::Mlp(l) => write!(f, "m{l}"),
        }
    }
}

impl std::str::FromStr for Unit {
    type Err = ModelError;
    /// `12` is layer 12, `a12` its attention block, `m12` its MLP block.
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            ModelError::InvalidPlan(format!(
                "`{s}` is not a skip unit (expected a layer number like 12, a12 for its attention \
                 block or m12 for its MLP block)"
            ))
        };
        let (make, digits): (fn(usize) -> Unit, &str) = match s.as_bytes().first() {
            Some(b'a') => (Unit::Attn, &s[1..]),
            Some(b'm') => (Unit::Mlp, &s[1..]),
            _ => (Unit::Layer, s),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        digits.parse().map(make).map_err(|_| bad())
    }
}
