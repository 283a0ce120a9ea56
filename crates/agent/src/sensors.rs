//! Simulated sensors of the seed 002 board: a potentiometer (12-bit ADC), a tactile switch and
//! a temperature sensor, moving plausibly over time.

use flotilla_device_core::SensorValues;
use rand::Rng;

#[derive(Debug)]
pub struct SimulatedBoard {
    pot: f64,
    switch: bool,
    phase: f64,
}

impl SimulatedBoard {
    pub fn new() -> Self {
        SimulatedBoard {
            pot: rand::rng().random_range(0.0..4095.0),
            switch: false,
            phase: rand::rng().random_range(0.0..std::f64::consts::TAU),
        }
    }

    pub fn sample(&mut self) -> SensorValues {
        let mut rng = rand::rng();
        self.pot = (self.pot + rng.random_range(-80.0..80.0)).clamp(0.0, 4095.0);
        if rng.random_bool(0.1) {
            self.switch = !self.switch;
        }
        self.phase += 0.05;
        let temp = 21.0 + 3.0 * self.phase.sin() + rng.random_range(-0.2..0.2);
        SensorValues {
            pot: Some(self.pot as u16),
            switch: Some(self.switch),
            temp: Some((temp * 10.0).round() as f32 / 10.0),
        }
    }
}
