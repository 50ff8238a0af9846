//! Live handover between two vswitch binaries (not built yet).
//!
//! It will own the versioned state format (magic, format version, length,
//! CRC, serde + bincode body; each released version frozen in
//! `format/vN.rs` with a checked-in fixture) and the handover protocol
//! over the control socket, passing tap, AF_XDP and listener fds with
//! SCM_RIGHTS, as `shared/DESIGN.md` §7 describes.
