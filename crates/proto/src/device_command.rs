//! The commands a device understands, typed: parsed once from a [`Command`]'s name and
//! arguments, by the device before it runs one and by the server before it accepts one, so
//! the two can never disagree on what is valid.

use alloc::format;
use alloc::string::String;
use serde_json::Value;

use crate::{Command, LedState, SensorKind};

/// Largest `args` a command may carry, as JSON text.
pub const MAX_COMMAND_ARGS: usize = 1024;

/// Every command name, for error hints.
pub const COMMAND_NAMES: &str = "led, led_brightness, sensor, reboot, ping";

/// One command, its arguments checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceCommand {
    /// `led {"state":"ON"|"OFF"}`.
    Led(LedState),
    /// `led_brightness {"value":0..=100}`.
    LedBrightness(u8),
    /// `sensor {"sensor":"pot"|"switch"|"temp","enabled":bool}`.
    Sensor { sensor: SensorKind, enabled: bool },
    /// `reboot`: the device restarts once its reply was delivered.
    Reboot,
    /// `ping`: answers `{"pong":true}`.
    Ping,
}

impl DeviceCommand {
    /// Parses `name` with `args` (a JSON object, or null for none). The error says what the
    /// caller must change.
    pub fn parse(name: &str, args: &Value) -> Result<DeviceCommand, String> {
        let obj = match args {
            Value::Null => None,
            Value::Object(m) => Some(m),
            _ => return Err("args must be a JSON object".into()),
        };
        let field = |k: &str| obj.and_then(|m| m.get(k));
        match name {
            "led" => parse_field(field("state"))
                .map(DeviceCommand::Led)
                .map_err(|_| "led needs args.state \"ON\" or \"OFF\"".into()),
            "led_brightness" => match field("value").and_then(Value::as_u64) {
                Some(v) if v <= 100 => Ok(DeviceCommand::LedBrightness(v as u8)),
                _ => Err("led_brightness needs args.value, an integer 0-100".into()),
            },
            "sensor" => {
                let sensor = parse_field(field("sensor"))
                    .map_err(|_| String::from("sensor needs args.sensor: pot, switch or temp"))?;
                let enabled = field("enabled")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| String::from("sensor needs args.enabled, a boolean"))?;
                Ok(DeviceCommand::Sensor { sensor, enabled })
            }
            "reboot" => Ok(DeviceCommand::Reboot),
            "ping" => Ok(DeviceCommand::Ping),
            _ => Err(format!(
                "unknown command '{}'; known: {COMMAND_NAMES}",
                crate::truncate_chars(name, 32)
            )),
        }
    }

    /// Parses what a [`Command`] carries.
    pub fn of(command: &Command) -> Result<DeviceCommand, String> {
        DeviceCommand::parse(&command.name, &command.args)
    }
}

fn parse_field<T: serde::de::DeserializeOwned>(v: Option<&Value>) -> Result<T, serde_json::Error> {
    serde_json::from_value(v.cloned().unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_command_and_refuses_the_rest_with_a_hint() {
        let ok = |name: &str, args: Value| DeviceCommand::parse(name, &args).unwrap();
        assert_eq!(
            ok("led", json!({"state":"ON"})),
            DeviceCommand::Led(LedState::On)
        );
        assert_eq!(
            ok("led_brightness", json!({"value":100})),
            DeviceCommand::LedBrightness(100)
        );
        assert_eq!(
            ok("sensor", json!({"sensor":"temp","enabled":false})),
            DeviceCommand::Sensor {
                sensor: SensorKind::Temp,
                enabled: false
            }
        );
        assert_eq!(ok("reboot", Value::Null), DeviceCommand::Reboot);
        assert_eq!(ok("ping", json!({})), DeviceCommand::Ping);
        let err = |name: &str, args: Value| DeviceCommand::parse(name, &args).unwrap_err();
        assert!(err("led", json!({"state":"on"})).contains("\"ON\""));
        assert!(err("led", json!([1])).contains("JSON object"));
        assert!(err("led_brightness", json!({"value":101})).contains("0-100"));
        assert!(err("led_brightness", json!({"value":-1})).contains("0-100"));
        assert!(err("sensor", json!({"sensor":"gps","enabled":true})).contains("pot, switch"));
        assert!(err("sensor", json!({"sensor":"pot"})).contains("enabled"));
        let unknown = err(&"x".repeat(100), Value::Null);
        assert!(
            unknown.contains(COMMAND_NAMES) && unknown.len() < 120,
            "{unknown}"
        );
    }
}
