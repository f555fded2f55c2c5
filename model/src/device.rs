//! Where a model runs: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.

use crate::error::{ModelError, Result};
use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A device named by the user (`--device`, the config file's `device` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host CPU (the default).
    #[default]
    Cpu,
    /// The NVIDIA GPU with this ordinal.
    Cuda(usize),
}

impl DeviceSpec {
    /// Whether this names a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, Self::Cuda(_))
    }

    /// Opens the device. A GPU needs a build with the `cuda` feature, a CUDA driver and a GPU
    /// of that ordinal; each missing piece is its own clear error.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => open_cuda(ordinal),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    let count = protocol::cuda::device_count()
        .map_err(|e| ModelError::Device(format!("cannot use cuda:{ordinal}: {e}")))?;
    if ordinal >= count {
        return Err(ModelError::Device(format!(
            "cannot use cuda:{ordinal}: the CUDA driver reports {count} GPU{}",
            if count == 1 { "" } else { "s" }
        )));
    }
    Device::new_cuda(ordinal)
        .map_err(|e| ModelError::Device(format!("cannot use cuda:{ordinal}: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(ModelError::Device(format!(
        "cannot use cuda:{ordinal}: this build has no CUDA support (build with `--features cuda`; the \
         README's \"On a GPU (CUDA)\" says how)"
    )))
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            ModelError::Device(format!(
                "unknown device {s:?} (expected cpu, cuda or cuda:N)"
            ))
        };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => {
                let n = other.strip_prefix("cuda:").ok_or_else(bad)?;
                n.parse().map(Self::Cuda).map_err(|_| bad())
            }
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print_back() {
        for (s, d) in [
            ("cpu", DeviceSpec::Cpu),
            ("CUDA", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap(), d);
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        for bad in ["", "tpu", "cuda:", "cuda:-1", "cuda:x", "cuda0"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cpu_opens_and_a_gpu_is_a_clear_error_without_one() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        // Without the `cuda` feature every GPU is refused naming the feature; with it, on a
        // machine whose driver has fewer GPUs, naming the count.
        #[cfg(not(feature = "cuda"))]
        {
            let e = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(
                e.contains("no CUDA support") && e.contains("--features cuda"),
                "{e}"
            );
        }
        #[cfg(feature = "cuda")]
        {
            let e = DeviceSpec::Cuda(4096).open().unwrap_err().to_string();
            assert!(e.starts_with("cannot use cuda:4096: "), "{e}");
        }
    }

    #[test]
    fn a_config_value_round_trips_through_serde() {
        let d: DeviceSpec = serde_json::from_str("\"cuda:1\"").unwrap();
        assert_eq!(d, DeviceSpec::Cuda(1));
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"cuda:1\"");
        assert!(serde_json::from_str::<DeviceSpec>("\"npu\"").is_err());
    }
}
