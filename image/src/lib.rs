//! Sealgate appliance image formats (F-IMAGE): the signed update bundle, the boot-control
//! record the stage-1 loader and the daemon share, the GPT of the appliance disk, the
//! image-signing key files and the dotted version numbers they all carry.
//!
//! Everything here is pure: formats over byte slices and `std::io` traits, bounded, with typed
//! errors. Building and running an image (feature `build`) is for `sealctl` only.

pub mod bootctl;
#[cfg(feature = "build")]
pub mod build;
pub mod bundle;
#[cfg(feature = "build")]
pub mod cpio;
pub mod gpt;
pub mod keys;
#[cfg(feature = "build")]
pub mod run;
pub mod version;

pub use version::Version;
