//! `tracing` set-up: `RUST_LOG` filtering, text or JSON lines on stderr.

use tracing_subscriber::EnvFilter;

use crate::progress::LogWriter;

pub fn init(json: bool) {
    init_with_bars(json, None);
}

/// [`init`], writing each line with the progress bars of `bars` cleared
/// so that lines and bars do not tear each other.
pub fn init_with_bars(json: bool, bars: Option<indicatif::MultiProgress>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,libp2p=warn,sled=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || LogWriter(bars.clone()));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
