//! `stowix serve`.

#[derive(clap::Args, Debug)]
pub struct ServeArgs {}

pub fn run(_args: ServeArgs) -> i32 {
    todo!()
}
