// zo2-tune's --help and usage messages say what the subcommands do: a flag a subcommand
// refuses is not offered, a default shown is the default, a refused value's range is named.
#include "tests/test_util.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <sstream>
#include <string>

namespace zo2 {
namespace {

namespace fs = std::filesystem;

int run(const std::string& args, std::string* out) {
  out->clear();
  return test::run_command(test::zo2_tune_path().string() + " " + args, out);
}

// The help line of `flag` (from its name to the end of the line), "" if absent.
std::string help_line(const std::string& help, const std::string& flag) {
  std::istringstream in(help);
  for (std::string line; std::getline(in, line);)
    if (const auto at = line.find("  " + flag); at != std::string::npos) return line.substr(at + 2);
  return "";
}

// generate places its prompts itself and prompts only with squad or drop: its help offers
// neither --padding-side nor the scored tasks, and both are refused by name.
TEST(HelpText, GenerateOffersOnlyWhatItTakes) {
  std::string out;
  ASSERT_EQ(run("generate --help", &out), 0) << out;
  EXPECT_EQ(out.find("--padding-side"), std::string::npos) << out;
  const std::string task = help_line(out, "--task");
  ASSERT_FALSE(task.empty()) << out;
  EXPECT_NE(task.find("{squad,drop}"), std::string::npos) << task;
  EXPECT_EQ(task.find("sst2"), std::string::npos) << task;
  // train, eval and data keep both.
  for (const char* sub : {"train", "eval", "data"}) {
    ASSERT_EQ(run(std::string(sub) + " --help", &out), 0) << sub;
    EXPECT_NE(out.find("--padding-side"), std::string::npos) << sub;
    EXPECT_NE(help_line(out, "--task").find("sst2"), std::string::npos) << sub << ": " << out;
  }
  // Refused before any file is read (the model does not exist).
  EXPECT_EQ(run("generate --model no-such-model --prompt x --task sst2", &out), 2) << out;
  EXPECT_NE(out.find("sst2"), std::string::npos) << out;
  EXPECT_EQ(run("generate --model no-such-model --prompt x --padding-side left", &out), 2) << out;
  EXPECT_NE(out.find("--padding-side: generate places its prompts itself"), std::string::npos) << out;
}

// --storage-dtype's default is an adapter run's own dtype (merge, eval, forward, generate),
// a resumed run's (train) or the seed log's (replay): no "=fp32" is shown where fp32 is not
// the default, and the text says what is. plan's default is fp32.
TEST(HelpText, StorageDtypeShowsOnlyATrueDefault) {
  std::string out;
  for (const char* sub : {"merge", "train", "eval", "replay", "forward", "generate"}) {
    ASSERT_EQ(run(std::string(sub) + " --help", &out), 0) << sub;
    const std::string line = help_line(out, "--storage-dtype");
    ASSERT_FALSE(line.empty()) << sub << ": " << out;
    EXPECT_EQ(line.find("=fp32"), std::string::npos) << sub << ": " << line;
    EXPECT_TRUE(line.find("default") != std::string::npos || line.find("ignored") != std::string::npos)
        << sub << ": " << line;
  }
  ASSERT_EQ(run("replay --help", &out), 0);
  EXPECT_NE(help_line(out, "--storage-dtype").find("seed log"), std::string::npos) << out;
  ASSERT_EQ(run("plan --help", &out), 0);
  EXPECT_NE(help_line(out, "--storage-dtype").find("=fp32"), std::string::npos) << out;
}

// A whole number past a 32-bit flag's field is refused with the range the flag takes: its
// documented one (api/options.cpp) where it has one, else the field's.
TEST(HelpText, AValueBeyondItsFlagNamesTheRange) {
  std::string out;
  EXPECT_EQ(run("train --model m --data d --out o --window 3000000000", &out), 2) << out;
  EXPECT_NE(out.find("zo2-tune: error: --window 3000000000: beyond what this flag can hold (must be an integer in "
                     "[1, 64])"),
            std::string::npos)
      << out;
  EXPECT_EQ(out.find("--help"), std::string::npos) << out;
  EXPECT_EQ(run("train --model m --data d --out o --disk-lag -3000000000", &out), 2) << out;
  EXPECT_NE(out.find("--disk-lag -3000000000: beyond what this flag can hold (must be an integer in [1, 2^10])"),
            std::string::npos)
      << out;
  // A flag with no documented range: the 32-bit field's.
  EXPECT_EQ(run("train --model m --data d --out o --lora-r 3000000000", &out), 2) << out;
  EXPECT_NE(out.find("--lora-r 3000000000: beyond what this flag can hold (a 32-bit field: an integer in "
                     "[-2147483648, 2147483647])"),
            std::string::npos)
      << out;
}

// synth-data draws its alphabet from the vocabulary: an --alphabet larger than it is refused
// naming both, not silently shrunk; the default (16) shrinks to a smaller vocabulary.
TEST(HelpText, SynthDataRefusesAnAlphabetBeyondTheVocabulary) {
  test::TempDir tmp;
  const fs::path file = tmp / "d.safetensors";
  std::string out;
  EXPECT_EQ(run("synth-data --vocab 100 --alphabet 1000 --rows 2 --seq 4 --out " + file.string(), &out), 2) << out;
  EXPECT_NE(out.find("--alphabet 1000"), std::string::npos) << out;
  EXPECT_NE(out.find("--vocab 100"), std::string::npos) << out;
  EXPECT_FALSE(fs::exists(file));
  EXPECT_EQ(run("synth-data --vocab 100 --alphabet 100 --rows 2 --seq 4 -q --out " + file.string(), &out), 0) << out;
  EXPECT_EQ(run("synth-data --vocab 8 --rows 2 --seq 4 -q --overwrite --out " + file.string(), &out), 0) << out;
}

}  // namespace
}  // namespace zo2
