//! The flow log: one JSON object per line, in Hubble's export shape
//! (`{"flow": {...}, "node_name": ..., "time": ...}`), to stdout or a file.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::PathBuf,
};

use crate::flow::record::{FlowLogLine, FlowRecord};

/// Where the flow log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowLogTarget {
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for FlowLogTarget {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdout" | "-" => FlowLogTarget::Stdout,
            path => FlowLogTarget::File(PathBuf::from(path)),
        })
    }
}

/// Errors writing the flow log.
#[derive(Debug, thiserror::Error)]
pub enum FlowLogError {
    #[error("cannot open flow log {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the flow log: {0}")]
    Write(#[from] io::Error),
}

/// Writes flow records as JSON lines.
pub struct FlowLogWriter {
    out: Box<dyn Write + Send>,
    /// Records written.
    pub written: u64,
}

impl FlowLogWriter {
    pub fn open(target: &FlowLogTarget) -> Result<FlowLogWriter, FlowLogError> {
        let out: Box<dyn Write + Send> = match target {
            FlowLogTarget::Stdout => Box::new(io::stdout()),
            FlowLogTarget::File(path) => {
                let f: File = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| FlowLogError::Open { path: path.display().to_string(), source })?;
                Box::new(BufWriter::new(f))
            }
        };
        Ok(FlowLogWriter { out, written: 0 })
    }

    pub fn write(&mut self, record: &FlowRecord) -> Result<(), FlowLogError> {
        let line = FlowLogLine::new(record.clone());
        serde_json::to_writer(&mut self.out, &line).map_err(io::Error::from)?;
        self.out.write_all(b"\n")?;
        self.written += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), FlowLogError> {
        self.out.flush()?;
        Ok(())
    }
}
