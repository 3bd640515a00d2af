// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Execution of control-socket requests ([`crate::control`]) on the test device. The socket
//! I/O lives in `control.rs`; this module only turns a parsed request into a JSON reply.

use irqbridge_core::{Delivery, MsiDelivery, SendOutcome};
use serde_json::{Value, json};

use super::regs::INTX_SOURCE_CONTROL;
use super::{DeviceError, TestDevice};
use crate::control::ControlRequest;
use crate::pci::{PciCore, error_chain};

fn send_outcome_name(o: SendOutcome) -> &'static str {
    match o {
        SendOutcome::Upcall { .. } => "upcall",
        SendOutcome::Coalesced => "coalesced",
        SendOutcome::Masked => "masked",
        SendOutcome::SelectorSet => "selector_set",
        SendOutcome::UpcallPending => "upcall_pending",
        SendOutcome::NotBound => "not_bound",
    }
}

fn msi_delivery_name(d: MsiDelivery) -> &'static str {
    match d {
        MsiDelivery::Sent => "sent",
        MsiDelivery::Pending => "pending",
        MsiDelivery::Disabled => "disabled",
        MsiDelivery::NotEnabled => "not_enabled",
        MsiDelivery::NoNotifier => "no_notifier",
    }
}

impl TestDevice {
    /// Runs one request and builds its reply (`{"ok":true,...}` or
    /// `{"ok":false,"error":"..."}`).
    pub(super) fn control_request(&mut self, core: &mut PciCore, req: &ControlRequest) -> Value {
        match self.control_exec(core, req) {
            Ok(Value::Object(mut map)) => {
                map.insert("ok".into(), true.into());
                Value::Object(map)
            }
            Ok(_) => json!({ "ok": true }),
            Err(e) => json!({ "ok": false, "error": e }),
        }
    }

    fn control_exec(&mut self, core: &mut PciCore, req: &ControlRequest) -> Result<Value, String> {
        let chain = |e: DeviceError| error_chain(&e);
        let vector16 = |v: u32| u16::try_from(v).map_err(|_| format!("vector {v} is out of range"));
        match *req {
            ControlRequest::IntxAssert => {
                let fired = self
                    .intx_set_level(core, INTX_SOURCE_CONTROL, true)
                    .map_err(chain)?;
                Ok(json!({ "fired": fired }))
            }
            ControlRequest::IntxDeassert => {
                self.intx_set_level(core, INTX_SOURCE_CONTROL, false)
                    .map_err(chain)?;
                Ok(json!({}))
            }
            ControlRequest::MsixFire { vector } => {
                let d = core
                    .msix_fire(vector16(vector)?)
                    .map_err(|e| chain(e.into()))?;
                let d = match d {
                    Delivery::Sent => "sent",
                    Delivery::Pending => "pending",
                    Delivery::NoNotifier => "no_notifier",
                };
                Ok(json!({ "delivery": d }))
            }
            ControlRequest::MsiFire { vector } => {
                let d = self.msi_fire(core, vector).map_err(chain)?;
                Ok(json!({ "delivery": msi_delivery_name(d) }))
            }
            ControlRequest::EvtchnSend { port } => {
                let o = self.evtchn_send(core, port).map_err(chain)?;
                let mut reply = json!({ "outcome": send_outcome_name(o) });
                if let SendOutcome::Upcall { vector } = o {
                    reply["vector"] = vector.into();
                }
                Ok(reply)
            }
            ControlRequest::EvtchnBind { port, vector } => {
                self.evtchn_bind(core, port, vector16(vector)?)
                    .map_err(chain)?;
                Ok(json!({}))
            }
            ControlRequest::Counters => Ok(json!({ "counters": self.counters(core) })),
            ControlRequest::Snapshot => {
                let s = serde_json::to_value(self.snapshot(core)).map_err(|e| e.to_string())?;
                Ok(json!({ "snapshot": s }))
            }
            ControlRequest::Reset => {
                core.reset();
                self.reset_state();
                Ok(json!({}))
            }
        }
    }
}
