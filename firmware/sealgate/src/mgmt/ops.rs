//! What only the appliance can do (slots, updates, reboot, power-off), behind a trait so that
//! the API runs on the dev board too (`None` there: 501).

use std::io::Read;
use std::path::PathBuf;

use axum::http::StatusCode;
use sealgate_image::bootctl::Slot;

use super::error::ApiError;

/// Running slot and health state, from memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `A` or `B`.
    pub running_slot: String,
    /// `starting`, `good`, `failed` or `unmarked`.
    pub health: String,
}

/// The appliance's slots, updates and reboot; `None` on the dev board (501 there).
pub trait ApplianceOps: Send + Sync + std::fmt::Debug {
    /// Running slot and version, both slots, rollback floor, last update, health (the
    /// status's `slot`, embedded as the installer shows it).
    fn status(&self) -> serde_json::Value;
    /// Blocking (run from `spawn_blocking`): installs the bundle read from `body` into the
    /// inactive slot; `Ok` describes what was installed.
    fn install(&self, body: &mut dyn Read) -> Result<sealgate_api::Installed, ApiError>;
    /// Reboots shortly after the reply went out.
    fn reboot(&self);
    /// Running slot and health state, from memory (no I/O): for the unauthenticated health
    /// endpoint.
    fn summary(&self) -> Summary;
    /// Powers off shortly after the reply went out.
    fn poweroff(&self);
    /// PEM files of the admin client certificates baked into the image (pinned).
    fn admin_certificates(&self) -> Vec<PathBuf>;
}

/// A slot's name on the wire: `A`, `B`.
fn slot_name(s: Slot) -> String {
    match s {
        Slot::A => "A",
        Slot::B => "B",
    }
    .to_string()
}

impl ApplianceOps for crate::appliance::Appliance {
    fn status(&self) -> serde_json::Value {
        let mut v = self.installer.status();
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "health".into(),
                serde_json::to_value(self.health()).unwrap_or(serde_json::Value::Null),
            );
        }
        v
    }

    fn install(&self, body: &mut dyn Read) -> Result<sealgate_api::Installed, ApiError> {
        use crate::appliance::update::UpdateError as U;
        match self.installer.install(body) {
            Ok(outcome) => Ok(sealgate_api::Installed {
                slot: slot_name(outcome.slot),
                version: sealgate_api::Version {
                    major: outcome.version.major,
                    minor: outcome.version.minor,
                    patch: outcome.version.patch,
                },
            }),
            Err(e) => {
                let status = match &e {
                    U::NotAppliance => StatusCode::NOT_IMPLEMENTED,
                    U::Busy | U::RunningOnTrial(_) => StatusCode::CONFLICT,
                    U::FloorRose { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                    U::Bundle(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    U::Body(_) => StatusCode::BAD_REQUEST,
                    U::BootCtl(_) | U::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                };
                Err(ApiError::new(status, e.check(), e.to_string()))
            }
        }
    }

    fn reboot(&self) {
        self.schedule_reboot();
    }

    fn poweroff(&self) {
        self.schedule_poweroff();
    }

    fn summary(&self) -> Summary {
        Summary {
            running_slot: slot_name(self.slot),
            health: self.health().state.to_string(),
        }
    }

    fn admin_certificates(&self) -> Vec<PathBuf> {
        self.admin_certs.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_the_serialized_ones() {
        for s in Slot::ALL {
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(slot_name(s))
            );
        }
    }
}
