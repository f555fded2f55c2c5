//! The flat parameter layout shared by the learner (writer) and the rollout server (reader).

use sha2::{Digest, Sha256};

use crate::error::ManifestError;

/// Alignment of every tensor inside a weight slot (bytes).
pub const TENSOR_ALIGN: usize = 64;

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit unsigned integer.
    U32,
    /// Byte.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 | Self::U32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::U8 => 1,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::F32 => 1,
            Self::F16 => 2,
            Self::BF16 => 3,
            Self::U32 => 4,
            Self::U8 => 5,
        }
    }
}

/// One tensor's place in the flat layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Parameter name (checkpoint naming).
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Byte offset inside a slot (multiple of [`TENSOR_ALIGN`]).
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// The layout of a parameter set: tensors in the given order, each 64-byte aligned, plus a
/// SHA-256 over the canonical description so both processes can check they agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    tensors: Vec<TensorSpec>,
    total_size: usize,
    hash: [u8; 32],
}

impl Manifest {
    /// Lays out `(name, shape, dtype)` entries in order.
    pub fn new<I, S>(entries: I) -> Result<Self, ManifestError>
    where
        I: IntoIterator<Item = (S, Vec<usize>, DType)>,
        S: Into<String>,
    {
        let mut tensors: Vec<TensorSpec> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut offset = 0usize;
        let mut hasher = Sha256::new();
        for (name, shape, dtype) in entries {
            let name: String = name.into();
            if !seen.insert(name.clone()) {
                return Err(ManifestError::DuplicateName(name));
            }
            let overflow = || ManifestError::Overflow(name.clone());
            let elems = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .ok_or_else(overflow)?;
            let size = elems.checked_mul(dtype.size()).ok_or_else(overflow)?;
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update([dtype.code()]);
            hasher.update((shape.len() as u64).to_le_bytes());
            for d in &shape {
                hasher.update((*d as u64).to_le_bytes());
            }
            hasher.update((offset as u64).to_le_bytes());
            let next = offset
                .checked_add(size)
                .and_then(|e| e.checked_add(TENSOR_ALIGN - 1))
                .map(|e| e / TENSOR_ALIGN * TENSOR_ALIGN)
                .ok_or_else(overflow)?;
            tensors.push(TensorSpec {
                name,
                shape,
                dtype,
                offset,
                size,
            });
            offset = next;
        }
        if tensors.is_empty() {
            return Err(ManifestError::Empty);
        }
        hasher.update((offset as u64).to_le_bytes());
        Ok(Self {
            tensors,
            total_size: offset,
            hash: hasher.finalize().into(),
        })
    }

    /// Tensors in layout order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Bytes of one slot's parameter data.
    pub fn total_size(&self) -> usize {
        self.total_size
    }

    /// SHA-256 of the layout.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The hash as lowercase hex.
    pub fn hash_hex(&self) -> String {
        to_hex(&self.hash)
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
