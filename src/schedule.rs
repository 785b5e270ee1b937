//! Learning-rate schedules: constant, step (milestones) and cosine, with an optional linear
//! warmup; evaluated per optimizer step.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Shape of the schedule after warmup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` at each milestone epoch.
    Step { milestones: Vec<usize>, gamma: f64 },
    /// Cosine decay from the base rate to 0 over the steps after warmup.
    Cosine,
}

/// The `--schedule` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Name {
    /// Cosine decay to 0.
    Cosine,
    /// Multiply by --gamma at each milestone.
    Step,
    /// The base rate throughout.
    Constant,
}

/// A learning-rate schedule over `total_steps` steps of `steps_per_epoch` each.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub base_lr: f64,
    pub kind: Kind,
    pub warmup_steps: usize,
    pub steps_per_epoch: usize,
    pub total_steps: usize,
}

impl Schedule {
    /// Parse `--schedule` ("cosine", "step", "constant").
    pub fn parse_kind(name: &str, milestones: &[usize], gamma: f64) -> Result<Kind> {
        use clap::ValueEnum;
        let n = Name::from_str(name, false)
            .map_err(|_| Error::config(format!("unknown schedule '{name}' (expected cosine, step or constant)")))?;
        Self::kind_of(n, milestones, gamma)
    }

    /// The schedule `--schedule` names, with the step schedule's milestones and factor.
    pub fn kind_of(name: Name, milestones: &[usize], gamma: f64) -> Result<Kind> {
        match name {
            Name::Cosine => Ok(Kind::Cosine),
            Name::Constant => Ok(Kind::Constant),
            Name::Step => {
                if !(gamma > 0.0 && gamma.is_finite()) {
                    return Err(Error::config(format!("--gamma must be positive, got {gamma}")));
                }
                Ok(Kind::Step {
                    milestones: milestones.to_vec(),
                    gamma,
                })
            }
        }
    }

    /// Learning rate of step `t` (0-based).
    pub fn lr(&self, t: usize) -> f64 {
        if t < self.warmup_steps {
            return self.base_lr * (t + 1) as f64 / self.warmup_steps as f64;
        }
        match &self.kind {
            Kind::Constant => self.base_lr,
            Kind::Step { milestones, gamma } => {
                let epoch = t / self.steps_per_epoch.max(1);
                let passed = milestones.iter().filter(|&&m| epoch >= m).count();
                self.base_lr * gamma.powi(passed as i32)
            }
            Kind::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let p = (t - self.warmup_steps) as f64 / span as f64;
                0.5 * self.base_lr * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos())
            }
        }
    }
}

/// The fine-tuning milestones of the paper (lr /10 after epochs 30, 60 and 80 of 90), scaled
/// to `epochs` and rounded; milestones that fall outside 1..=epochs are dropped.
pub fn paper_milestones(epochs: usize) -> Vec<usize> {
    let mut m: Vec<usize> = [30, 60, 80]
        .iter()
        .map(|&k| (k * epochs + 45) / 90)
        .filter(|&k| k >= 1 && k <= epochs)
        .collect();
    m.dedup();
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: Kind, warmup: usize) -> Schedule {
        Schedule {
            base_lr: 0.1,
            kind,
            warmup_steps: warmup,
            steps_per_epoch: 10,
            total_steps: 100,
        }
    }

    #[test]
    fn warmup_is_linear_then_cosine_decays_to_zero() {
        let s = sched(Kind::Cosine, 10);
        assert!((s.lr(0) - 0.01).abs() < 1e-12);
        assert!((s.lr(9) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 0.1).abs() < 1e-12);
        assert!((s.lr(55) - 0.05).abs() < 1e-12);
        assert!(s.lr(99) < 1e-3);
        assert!(s.lr(99) > 0.0);
    }

    #[test]
    fn step_schedule_divides_at_milestones() {
        let s = sched(
            Kind::Step {
                milestones: vec![3, 6],
                gamma: 0.1,
            },
            0,
        );
        assert_eq!(s.lr(29), 0.1);
        assert!((s.lr(30) - 0.01).abs() < 1e-12);
        assert!((s.lr(60) - 0.001).abs() < 1e-12);
        assert_eq!(sched(Kind::Constant, 0).lr(77), 0.1);
    }

    #[test]
    fn bad_names_are_errors() {
        assert!(Schedule::parse_kind("linear", &[], 0.1).is_err());
        assert!(Schedule::parse_kind("step", &[1], -1.0).is_err());
    }
}
