//! Where results go: the process's output, shared with the watchdog's
//! thread, and a writer that says what was being written when writing
//! fails.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

/// Where results go: shared, so that the watchdog's thread can write the
/// workload's report so far if it has to end a stalled run. Each write
/// locks it for that write only.
pub type Output = Arc<Mutex<dyn Write + Send>>;

/// The shared output as a writer, locked for each call.
pub struct Shared<'a>(pub &'a Output);

impl Write for Shared<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush()
    }
}

/// Says what was being written when output fails (a closed pipe, a full
/// disk), instead of a bare "Broken pipe (os error 32)".
pub struct Labelled<W>(pub W);

impl<W: Write> Write for Labelled<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(label)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(label)
    }
}

fn label(err: io::Error) -> io::Error {
    io::Error::new(err.kind(), format!("writing the results to stdout: {err}"))
}
