//! What this build is: the version, the commit and the commit's date, as
//! `overlayd --version` and the `overlay_build_info` metric say them.

/// The commit the binary was built from (`-dirty` with local changes; `unknown` outside git).
pub const COMMIT: &str = env!("OVERLAY_COMMIT");
/// The date of that commit.
pub const BUILD_DATE: &str = env!("OVERLAY_BUILD_DATE");
/// `overlayd --version`'s line after the name.
pub const LINE: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("OVERLAY_COMMIT"), ", ", env!("OVERLAY_BUILD_DATE"), ")");
