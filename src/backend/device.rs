//! The `--device` choice: `auto`, `cpu`, `cuda` or `cuda:N`, carried in every configuration.
//!
//! Checkpoints are device-independent (flat f32 buffers), so the device is a setting a resumed
//! run may change; it is recorded in `config.json` and `summary.json`.

use crate::{Error, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Where a run computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// A GPU when this build and machine have one, else the CPU.
    #[default]
    Auto,
    /// The CPU backend (the reference).
    Cpu,
    /// A CUDA GPU: the rank's local GPU, or GPU N.
    Cuda(Option<usize>),
    /// The CUDA backend on the emulated device (its kernels compiled for and run on the
    /// host): a testing device, slow, for checking the CUDA code where there is no GPU.
    CudaEmu,
}

/// The backend a [`Device`] resolves to on this build and machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Cpu,
    /// A GPU: the given one, or the rank's local one.
    Cuda(Option<usize>),
    CudaEmulated,
}

/// Why `--device auto` took the CPU, once it has (the run banner says it).
static AUTO_NOTE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Why `--device auto` fell back to the CPU in this process, if it did.
pub fn auto_note() -> Option<&'static str> {
    AUTO_NOTE.get().map(String::as_str)
}

/// The values `--device` accepts, for help and error messages.
pub const DEVICE_VALUES: &str = "auto, cpu, cuda, cuda:N or cuda-emu (testing)";

impl Device {
    /// The backend this choice means here; an error names what is missing. `auto` takes a
    /// GPU when the driver sees one, else the CPU ([`auto_note`] says why; the run banner
    /// prints it).
    pub fn resolve(self) -> Result<Resolved> {
        match self {
            Device::Cpu => Ok(Resolved::Cpu),
            Device::CudaEmu => Ok(Resolved::CudaEmulated),
            Device::Cuda(n) => match crate::backend::cuda::gpu::probe() {
                Ok(_) => Ok(Resolved::Cuda(n)),
                Err(e) => Err(Error::config(format!(
                    "--device {self}: {}",
                    e.to_string().trim_start_matches("backend: ")
                ))),
            },
            Device::Auto => match crate::backend::cuda::gpu::probe() {
                Ok(_) => Ok(Resolved::Cuda(None)),
                Err(e) => {
                    let why = e.to_string().trim_start_matches("backend: ").to_string();
                    let _ = AUTO_NOTE.set(format!("--device auto: {why}; using the CPU"));
                    Ok(Resolved::Cpu)
                }
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            Device::CudaEmu => f.write_str("cuda-emu"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(None)),
            "cuda-emu" => Ok(Device::CudaEmu),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(Some(n))),
                _ => Err(Error::config(format!(
                    "unknown device '{s}' (expected {DEVICE_VALUES})"
                ))),
            },
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_print_and_round_trip_through_json() {
        for (text, d) in [
            ("auto", Device::Auto),
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(None)),
            ("cuda:3", Device::Cuda(Some(3))),
            ("cuda-emu", Device::CudaEmu),
        ] {
            assert_eq!(text.parse::<Device>().unwrap(), d);
            assert_eq!(d.to_string(), text);
            let json = serde_json::to_string(&d).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<Device>(&json).unwrap(), d);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let e = bad.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("unknown device") && e.contains(bad), "{e}");
        }
        // on a machine without a GPU (CI): auto is the CPU, cuda an error that says why
        if crate::backend::cuda::gpu::probe().is_err() {
            assert_eq!(Device::Auto.resolve().unwrap(), Resolved::Cpu);
            let e = Device::Cuda(Some(1)).resolve().unwrap_err().to_string();
            assert!(
                e.starts_with("--device cuda:1: ") && (e.contains("driver") || e.contains("GPU")),
                "{e}"
            );
        }
        assert_eq!(Device::CudaEmu.resolve().unwrap(), Resolved::CudaEmulated);
    }
}
