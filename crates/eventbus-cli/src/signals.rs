//! Graceful shutdown on SIGTERM and SIGINT: the first signal cancels the
//! command's shutdown token (it stops taking new work, finishes what is in
//! flight within its close timeout, flushes publishes and exits 0); a
//! second signal exits at once with status 130.

use tokio_util::sync::CancellationToken;

/// Cancels `shutdown` at the first SIGTERM or SIGINT, and exits the
/// process at the second.
///
/// # Errors
/// [`Config`](eventbus::ErrorKind::Config) when the signal handlers cannot
/// be installed.
pub(crate) fn drain_on_signal(shutdown: CancellationToken) -> eventbus::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let fail =
        |e: std::io::Error| eventbus::Error::config("cannot install the signal handlers").with_source(e);
    let mut term = signal(SignalKind::terminate()).map_err(fail)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(fail)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("draining: finishing in-flight work (a second signal exits at once)");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(())
}
