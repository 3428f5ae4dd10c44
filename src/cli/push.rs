//! `stowix nix push`.

#[derive(clap::Args, Debug)]
pub struct PushArgs {}

pub fn run(_args: PushArgs) -> i32 {
    todo!()
}
