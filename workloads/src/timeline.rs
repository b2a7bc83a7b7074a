//! What functions print about where their time went, for the job's timeline
//! plot: one line per phase, `phase=NAME start_ns=N end_ns=N`, in wall-clock
//! nanoseconds (comparable across the functions of one machine).

use std::io::{self, Write};

pub use crate::ring::now_ns;

/// The phases the workloads report, in the order they usually happen.
pub const SOURCE: &str = "source";
pub const EXCHANGE: &str = "exchange";
pub const ENCODE: &str = "encode";
pub const COLLECT: &str = "collect";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    pub name: String,
    pub start_ns: u128,
    pub end_ns: u128,
}

pub fn write_phase(
    out: &mut impl Write,
    name: &str,
    start_ns: u128,
    end_ns: u128,
) -> io::Result<()> {
    writeln!(out, "phase={name} start_ns={start_ns} end_ns={end_ns}")
}

/// Runs `f` and reports it as phase `name`.
pub fn timed<T, E>(
    out: &mut impl Write,
    name: &str,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<T, E>
where
    E: From<io::Error>,
{
    let start = now_ns();
    let value = f()?;
    write_phase(out, name, start, now_ns())?;
    Ok(value)
}

/// The `key=value` fields of a line, in order.
pub fn fields(line: &str) -> impl Iterator<Item = (&str, &str)> {
    line.split_whitespace().filter_map(|f| f.split_once('='))
}

/// Every phase line of a function's output.
pub fn parse_phases(output: &str) -> Vec<Phase> {
    output
        .lines()
        .filter_map(|line| {
            let mut name = None;
            let (mut start, mut end) = (None, None);
            for (k, v) in fields(line) {
                match k {
                    "phase" => name = Some(v.to_string()),
                    "start_ns" => start = v.parse().ok(),
                    "end_ns" => end = v.parse().ok(),
                    _ => {}
                }
            }
            Some(Phase {
                name: name?,
                start_ns: start?,
                end_ns: end?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_lines_round_trip() {
        let mut out = Vec::new();
        write_phase(&mut out, ENCODE, 10, 20).unwrap();
        let r: Result<u8, io::Error> = timed(&mut out, COLLECT, || Ok(1));
        assert_eq!(r.unwrap(), 1);
        writeln!(out, "started_ns=5\nphase=broken start_ns=x end_ns=1").unwrap();
        let phases = parse_phases(std::str::from_utf8(&out).unwrap());
        assert_eq!(phases.len(), 2);
        assert_eq!(
            phases[0],
            Phase {
                name: ENCODE.into(),
                start_ns: 10,
                end_ns: 20
            }
        );
        assert_eq!(phases[1].name, COLLECT);
        assert!(phases[1].end_ns >= phases[1].start_ns);
    }
}
