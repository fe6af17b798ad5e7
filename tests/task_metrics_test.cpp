// MeZO's task metrics (tools/task_metrics.h) on hand-computed cases, each worked out from
// the definitions of SQuAD v1.1's evaluate-v1.1.py (normalize_answer, f1_score,
// exact_match_score), MeZO's large_models/metrics.py (max over gold answers; the
// "CANNOTANSWER"/"no answer" case) and SuperGLUE's MultiRC F1a/EM.
#include "tools/task_metrics.h"

#include <gtest/gtest.h>

namespace zo2::cli::metrics {
namespace {

TEST(TaskMetrics, NormalizationLowersDropsPunctuationArticlesAndExtraSpace) {
  EXPECT_EQ(normalize_answer("The Quick, Brown  fox!"), "quick brown fox");
  EXPECT_EQ(normalize_answer("an apple a day"), "apple day");
  // Articles only as whole words: "theater", "another", "Ana" stay.
  EXPECT_EQ(normalize_answer("the theater, another Ana"), "theater another ana");
  // Punctuation goes first, so "A.N. Other" becomes "an other" and then loses "an".
  EXPECT_EQ(normalize_answer("A.N. Other"), "other");
  // Punctuation inside a word joins it (no space is left): "1,000" == "1000", "24.0" == "240".
  EXPECT_EQ(normalize_answer("1,000"), "1000");
  EXPECT_EQ(normalize_answer("24.0"), "240");
  EXPECT_EQ(normalize_answer("state-of-the-art"), "stateoftheart");
  // Python 3 str semantics beyond ASCII: lower() of Latin capitals, \b around non-ASCII
  // letters (é is a word character, so "thé" keeps its "th"), split() on a no-break space.
  EXPECT_EQ(normalize_answer("\xC3\x89" "COLE \xC3\x9C" "ber"), "\xC3\xA9" "cole \xC3\xBC" "ber");
  EXPECT_EQ(normalize_answer("th\xC3\xA9 the"), "th\xC3\xA9");
  EXPECT_EQ(normalize_answer("New\xC2\xA0York"), "new york");
  // Non-ASCII punctuation is not in string.punctuation: it stays (a dash is not a word char).
  EXPECT_EQ(normalize_answer("a\xE2\x80\x94the"), "\xE2\x80\x94");
  EXPECT_EQ(normalize_answer(""), "");
  EXPECT_EQ(normalize_answer("The."), "");
}

TEST(TaskMetrics, NormalizationFollowsPythonsUnicodeLowerAndWordCharactersBeyondLatin1) {
  // Each expected value is CPython 3's normalize_answer of the input.
  // str.lower() is the full Unicode lowercase: Greek with final sigma, Latin Extended-B's
  // DŽ, Armenian, Cherokee (lower-cased to the Cherokee Supplement), İ → "i̇".
  EXPECT_EQ(normalize_answer("\xCE\x9F\xCE\x94\xCE\x9F\xCE\xA3 \xCE\x9A\xCE\x91\xCE\x9B\xCE\x9F\xCE\xA3"),
            "\xCE\xBF\xCE\xB4\xCE\xBF\xCF\x82 \xCE\xBA\xCE\xB1\xCE\xBB\xCE\xBF\xCF\x82");  // ΟΔΟΣ ΚΑΛΟΣ → οδος καλος
  EXPECT_EQ(normalize_answer("\xC7\x84" "EMAL"), "\xC7\x86" "emal");                     // ǄEMAL → ǆemal
  EXPECT_EQ(normalize_answer("\xD4\xB1\xD5\x90\xD4\xB1\xD5\x84 the"), "\xD5\xA1\xD6\x80\xD5\xA1\xD5\xB4");  // ԱՐԱՄ the
  EXPECT_EQ(normalize_answer("\xE1\x8F\x97\xE1\x8F\xA9"), "\xEA\xAE\xA7\xEA\xAE\xB9");  // ᏗᏩ → ꮧꮹ
  EXPECT_EQ(normalize_answer("\xC4\xB0stanbul"), "i\xCC\x87stanbul");
  // \w is str.isalnum() or "_": a currency sign, a degree sign or a combining mark ends the
  // word "the" (so it goes); a Roman numeral or a vulgar fraction continues it (it stays).
  EXPECT_EQ(normalize_answer("the\xE2\x82\xAC"), "\xE2\x82\xAC");     // the€ → €
  EXPECT_EQ(normalize_answer("the\xC2\xB0" "C"), "\xC2\xB0" "c");     // the°C → °c
  EXPECT_EQ(normalize_answer("the\xCC\x81"), "\xCC\x81");             // the + U+0301 → U+0301
  EXPECT_EQ(normalize_answer("the\xE2\x85\xAB"), "the\xE2\x85\xBB");  // theⅫ → theⅻ
  EXPECT_EQ(normalize_answer("the\xC2\xBD"), "the\xC2\xBD");          // the½ stays
  EXPECT_EQ(qa_em("the\xE2\x82\xAC", {"\xE2\x82\xAC"}), 1.0);
  // Punctuation is still ASCII's string.punctuation only: "«" and "»" stay.
  EXPECT_EQ(normalize_answer("\xC2\xAB" "b\xC2\xBB"), "\xC2\xAB" "b\xC2\xBB");
  EXPECT_EQ(normalize_answer("\xC2\xAB" "a\xC2\xBB"), "\xC2\xAB \xC2\xBB");  // "a" is a word between them
}

TEST(TaskMetrics, DropFloatAcceptsUnicodeDigitsAndWhiteSpaceAsPython) {
  // float("١٢") == 12.0, float("１２.5") == 12.5 and float("\u00a012\u3000") == 12.0 in
  // CPython; the Arabic decimal separator "٫" is not ".", so float("١٫٥") is a ValueError.
  double v = 0;
  ASSERT_TRUE(detail::py_float("\xD9\xA1\xD9\xA2", &v));
  EXPECT_EQ(v, 12.0);
  ASSERT_TRUE(detail::py_float("\xEF\xBC\x91\xEF\xBC\x92.5", &v));
  EXPECT_EQ(v, 12.5);
  ASSERT_TRUE(detail::py_float("\xC2\xA0" "12\xE3\x80\x80", &v));
  EXPECT_EQ(v, 12.0);
  EXPECT_FALSE(detail::py_float("\xD9\xA1\xD9\xAB\xD9\xA5", nullptr));
  EXPECT_FALSE(detail::py_float("\xE2\x85\xAB", nullptr));  // Ⅻ has a numeric value but is no decimal digit
  // drop_eval: a number written in Arabic-Indic digits is the number.
  EXPECT_EQ(drop_normalize("\xD9\xA1\xD9\xA2"), "12.0");
  EXPECT_EQ(drop_question("\xD9\xA1\xD9\xA2 points", {{"12"}}).f1, 0.67);  // the number matches
  EXPECT_EQ(drop_question("\xD9\xA1\xD9\xA2", {{"12"}}).em, 1.0);
  // Python's gold_answer[0].strip(): a gold of Unicode white space alone is blank, skipped
  // (were it scored, the empty prediction would match it exactly).
  EXPECT_EQ(drop_question("", {{"\xE3\x80\x80"}}).em, 0.0);
}

TEST(TaskMetrics, TokenF1CountsSharedTokensWithMultiplicity) {
  // pred [cat, sat], gold [cat, sat, on, mat]: P = 1, R = 1/2, F1 = 2/3.
  EXPECT_DOUBLE_EQ(token_f1("the cat sat", "a cat sat on the mat"), 2.0 / 3.0);
  // Counter intersection: [cat, cat, dog] & [cat, dog, dog] = {cat: 1, dog: 1}: P = R = 2/3.
  EXPECT_DOUBLE_EQ(token_f1("cat cat dog", "cat dog dog"), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(token_f1("Denver Broncos", "the Denver Broncos"), 1.0);
  EXPECT_DOUBLE_EQ(token_f1("Broncos", "Denver Broncos"), 2.0 * 1.0 * 0.5 / 1.5);
  EXPECT_DOUBLE_EQ(token_f1("", "Denver"), 0.0);
  // Both empty after normalization: nothing is shared, so 0 (v1.1's rule; v2.0 would give 1),
  // while exact match says 1 ("" == "").
  EXPECT_DOUBLE_EQ(token_f1("a", "the"), 0.0);
  EXPECT_DOUBLE_EQ(qa_em("a", {"the"}), 1.0);
}

TEST(TaskMetrics, QaF1AndEmTakeTheBestGoldAnswer) {
  const std::vector<std::string> golds{"The Denver Broncos", "Denver Broncos", "Broncos of Denver"};
  EXPECT_DOUBLE_EQ(qa_f1("Broncos", golds), 2.0 / 3.0);  // best: "Denver Broncos" (P 1, R 1/2)
  EXPECT_DOUBLE_EQ(qa_em("Broncos", golds), 0.0);
  EXPECT_DOUBLE_EQ(qa_f1("denver broncos.", golds), 1.0);
  EXPECT_DOUBLE_EQ(qa_em("denver broncos.", golds), 1.0);
  EXPECT_DOUBLE_EQ(qa_f1("x", {}), 0.0);
  EXPECT_DOUBLE_EQ(qa_em("x", {}), 0.0);
  // DROP through MeZO: the spans of every validated answer are alternative golds, and the
  // numbers get no DROP normalization: "24.0" is "240", not 24.
  const std::vector<std::string> drop{"Smith", "Jones", "Smith"};
  EXPECT_DOUBLE_EQ(qa_f1("Jones", drop), 1.0);
  EXPECT_DOUBLE_EQ(qa_f1("Smith and Jones", drop), 2.0 * (1.0 / 3.0) * 1.0 / (1.0 / 3.0 + 1.0));
  EXPECT_DOUBLE_EQ(qa_f1("24.0", {"24"}), 0.0);
  EXPECT_DOUBLE_EQ(qa_f1("1,000", {"1000"}), 1.0);
  EXPECT_DOUBLE_EQ(qa_f1("24 points", {"24"}), 2.0 * 0.5 * 1.0 / 1.5);
}

TEST(TaskMetrics, NoAnswerGoldsAreScoredByExactMatch) {
  // MeZO: the first gold "no answer" / "CANNOTANSWER" makes F1 an exact match with it.
  EXPECT_DOUBLE_EQ(qa_f1("No answer.", {"no answer"}), 1.0);
  EXPECT_DOUBLE_EQ(qa_f1("no", {"no answer"}), 0.0);  // token F1 would be 2/3
  EXPECT_DOUBLE_EQ(qa_f1("CANNOTANSWER", {"CANNOTANSWER", "x"}), 1.0);
  EXPECT_DOUBLE_EQ(qa_f1("x", {"CANNOTANSWER", "x"}), 0.0);  // the other golds are not looked at
  // Only the first gold triggers it.
  EXPECT_DOUBLE_EQ(qa_f1("no", {"x", "no answer"}), 2.0 / 3.0);
}

TEST(TaskMetrics, DropOfficialNormalizationReadsNumbersAsPythonFloats) {
  // Python's str(float(x)): repr's shortest digits, positional for exponents in [-4, 16).
  EXPECT_EQ(detail::py_float_str(24.0), "24.0");
  EXPECT_EQ(detail::py_float_str(1e16), "1e+16");
  EXPECT_EQ(detail::py_float_str(1e15), "1000000000000000.0");
  EXPECT_EQ(detail::py_float_str(1e-5), "1e-05");
  EXPECT_EQ(detail::py_float_str(0.0001), "0.0001");
  EXPECT_EQ(detail::py_float_str(1.5e-7), "1.5e-07");
  EXPECT_EQ(detail::py_float_str(123456789012345680.0), "1.2345678901234568e+17");
  EXPECT_EQ(detail::py_float_str(1234.5), "1234.5");
  EXPECT_EQ(detail::py_float_str(-2.5), "-2.5");
  EXPECT_EQ(detail::py_float_str(0.1), "0.1");
  // Python's float() grammar.
  for (const char* yes : {"24", " 24 ", "+1.5", "-.5", "5.", "1e3", "1E-3", "1_000", "1e1_0", "inf", "-Infinity", "nan"})
    EXPECT_TRUE(detail::py_float(yes, nullptr)) << yes;
  for (const char* no : {"", ".", "e5", "1e", "1__0", "_1", "1_", "0x10", "1,000", "12a", "--1"})
    EXPECT_FALSE(detail::py_float(no, nullptr)) << no;
  double v = 0;
  ASSERT_TRUE(detail::py_float("1_000.5", &v));
  EXPECT_EQ(v, 1000.5);
  // drop_eval's _normalize_answer: tokens split at " " and "-", punctuation kept in numbers.
  EXPECT_EQ(drop_normalize("24"), "24.0");
  EXPECT_EQ(drop_normalize("1,000"), "1000.0");  // not a float, so unpunctuated, then one
  EXPECT_EQ(drop_normalize("3.50"), "3.5");
  EXPECT_EQ(drop_normalize("1e3"), "1000.0");
  EXPECT_EQ(drop_normalize("1e16"), "1e+16");
  EXPECT_EQ(drop_normalize("0.00001"), "1e-05");
  EXPECT_EQ(drop_normalize("-5"), "5.0");  // the "-" splits: the sign is lost
  EXPECT_EQ(drop_normalize("The Bears"), "bears");
  EXPECT_EQ(drop_normalize("state-of-the-art"), "state of art");
  EXPECT_EQ(drop_normalize("5 May 1990"), "5.0 may 1990.0");
}

TEST(TaskMetrics, DropOfficialF1AlignsTheAnswerWithTheGoldSpansAndMatchesNumbers) {
  // Hand-computed from drop_eval.py's get_metrics (one predicted span):
  auto m = [](const char* pred, std::vector<std::string> gold) { return drop_metrics(pred, gold); };
  EXPECT_EQ(m("24", {"24.0"}).em, 1.0);  // "24.0" == "24.0"
  EXPECT_EQ(m("24", {"24.0"}).f1, 1.0);
  EXPECT_EQ(m("24 points", {"24"}).f1, 0.67);  // P 1/2, R 1 → 2/3, rounded to 2 places
  EXPECT_EQ(m("24 points", {"24"}).em, 0.0);
  EXPECT_EQ(m("25", {"24"}).f1, 0.0);  // the gold's number is not in the prediction
  EXPECT_EQ(m("25 points", {"24 points"}).f1, 0.0);  // even with a shared word
  EXPECT_EQ(m("Smith", {"Smith", "Jones"}).f1, 0.5);  // 1 for Smith, over 2 gold spans
  EXPECT_EQ(m("Smith", {"Smith", "Jones"}).em, 0.0);  // EM needs the same set of spans
  EXPECT_EQ(m("Smith and Jones", {"Smith", "Jones"}).f1, 0.25);  // best 1/2, over 2
  EXPECT_EQ(m("Smith and Jones", {"Smith", "Brown", "Green", "White"}).f1, 0.12);  // 0.125, ties to even
  EXPECT_EQ(m("May 1990", {"5 May 1990"}).f1, 0.8);  // the numbers 1990.0 match; P 1, R 2/3
  // A question: the best over its gold answers; a blank gold is not one.
  EXPECT_EQ(drop_question("Smith", {{"Smith", "Jones"}, {"Smith"}}).f1, 1.0);
  EXPECT_EQ(drop_question("Smith", {{"Smith", "Jones"}, {"Smith"}}).em, 1.0);
  EXPECT_EQ(drop_question("", {{"  "}}).f1, 0.0);
  EXPECT_EQ(drop_question("", {{"  "}, {"x"}}).em, 0.0);
  EXPECT_EQ(drop_question("x", {{" "}, {"x"}}).em, 1.0);
  EXPECT_EQ(drop_question("x", {}).f1, 0.0);
}

TEST(TaskMetrics, MultiRCF1aOverOptionsAndEmOverQuestions) {
  // Options of questions 0, 0, 1, 2: tp 2, fp 0, fn 1 → F1a = 4/5; question 0 has a wrong
  // option → EM 2/3.
  const auto s = multirc_scores({1, 0, 1, 0}, {1, 1, 1, 0}, {0, 0, 1, 2});
  EXPECT_DOUBLE_EQ(s.f1a, 0.8);
  EXPECT_DOUBLE_EQ(s.em, 2.0 / 3.0);
  // No true positive: F1a 0 (sklearn's zero_division for binary F1), EM still counted.
  const auto z = multirc_scores({0, 0}, {0, 1}, {5, 7});
  EXPECT_DOUBLE_EQ(z.f1a, 0.0);
  EXPECT_DOUBLE_EQ(z.em, 0.5);
  // One false positive: P 1/2, R 1 → 2/3.
  EXPECT_DOUBLE_EQ(multirc_scores({1, 1}, {1, 0}, {0, 0}).f1a, 2.0 / 3.0);
}

}  // namespace
}  // namespace zo2::cli::metrics
