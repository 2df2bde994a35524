//! `sealgate-loader`: the stage-1 loader, `/init` of the appliance's initramfs (see
//! `sealgate_board::loader`). Built static:
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target x86_64-unknown-linux-gnu -p sealgate-board --bin sealgate-loader`.

fn main() {
    sealgate_board::loader::main()
}
