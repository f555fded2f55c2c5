//! 8-bit (and 4-bit) behavior weights: the decoder's linear layers re-quantized from the
//! current f32 weights for the rollout path. Q8_0 on the CPU runs the batched kernel of
//! [`crate::qgemm`] (the same quantization as candle's, a weight block loaded once per tile of
//! rows); other formats and devices run candle's quantized matmul.
//!
//! The learner keeps f32; a quantized decoder is a read-only copy built by
//! [`crate::Decoder::quantized`] whenever new weights arrive. Its log-probs are those of the
//! model that samples, so the off-policy corrections stay exact.

use crate::error::{ModelError, Result};
use crate::qgemm::Q8Matrix;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The storage of the behavior's linear-layer weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// The f32 weights themselves.
    #[default]
    F32,
    /// 8-bit blocks of 32 with an f16 scale (GGML Q8_0): about 8.5 bits per weight.
    Q8_0,
    /// 4-bit blocks of 32 with an f16 scale (GGML Q4_0): about 4.5 bits per weight.
    Q4_0,
}

impl WeightFormat {
    fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::F32 => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
        }
    }

    /// Whether the weights are re-quantized.
    pub fn is_quantized(self) -> bool {
        self != Self::F32
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        })
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "q8_0" | "q8" => Ok(Self::Q8_0),
            "q4_0" | "q4" => Ok(Self::Q4_0),
            other => Err(ModelError::InvalidInput(format!(
                "unknown weight format `{other}` (expected f32, q8_0 or q4_0)"
            ))),
        }
    }
}

/// A linear layer's weight, (out, in): dense, or re-quantized.
#[derive(Debug, Clone)]
pub(crate) enum Lin {
    Dense(Tensor),
    Quant(Arc<QMatMul>),
    /// Q8_0 on the CPU, for [`crate::qgemm`]'s batched kernel.
    Q8(Arc<Q8Matrix>),
}

impl Lin {
    /// Re-quantizes a dense weight. A weight whose input width is not a multiple of the block
    /// size stays dense (the format cannot hold it).
    pub(crate) fn quantize(&self, format: WeightFormat) -> Result<Lin> {
        let (Lin::Dense(w), Some(dtype)) = (self, format.ggml()) else {
            return Ok(self.clone());
        };
        let (_, k) = w.dims2()?;
        if k % dtype.block_size() != 0 {
            return Ok(self.clone());
        }
        if format == WeightFormat::Q8_0 && w.device().is_cpu() {
            let (n, k) = w.dims2()?;
            let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            return Ok(Lin::Q8(Arc::new(Q8Matrix::quantize(&data, n, k)?)));
        }
        let q = QTensor::quantize(w, dtype)?;
        Ok(Lin::Quant(Arc::new(QMatMul::from_qtensor(q)?)))
    }

    /// `x @ w^T` for a 2-D contiguous `x` of shape (rows, in).
    pub(crate) fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Lin::Dense(w) => x.matmul(&w.t()?)?,
            Lin::Quant(q) => q.forward(x)?,
            Lin::Q8(q) => {
                let (m, _) = x.dims2()?;
                let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let y = q.matmul_t(&xs, m)?;
                Tensor::from_vec(y, (m, q.out_dim()), x.device())?.to_dtype(x.dtype())?
            }
        })
    }

    /// Output width.
    pub(crate) fn out_dim(&self) -> Result<usize> {
        Ok(match self {
            Lin::Dense(w) => w.dim(0)?,
            Lin::Quant(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.shape().dims2()?.0,
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dim(0)?,
            },
            Lin::Q8(q) => q.out_dim(),
        })
    }
}
