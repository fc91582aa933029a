"""`python -m training {train,evaluate,export,synthetic}`."""

import argparse

from training import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train.add_arguments(commands.add_parser("train", help="train the classifier or the segmenter"))
    args = parser.parse_args(argv)
    if args.command == "train":
        train.train(args)


if __name__ == "__main__":
    main()
