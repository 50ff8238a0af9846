//! vswitch-agent: programs one host's vswitch from etcd (desired state in,
//! status out), and Hoverboard's controller. The switch is reached only
//! through its control socket, with the control API's JSON; nothing of the
//! switch's own crates is imported.

pub mod agent;
pub mod controller;
pub mod desired;
pub mod layout;
pub mod model;
pub mod sim;
pub mod status;
pub mod store;
pub mod switch;
pub mod sync;
