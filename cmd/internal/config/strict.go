package config

import (
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// decodeStrict decodes YAML into out, refusing keys that out has no field
// for and malformed durations, naming each by its dotted path
// (authn.jwt.jwksFil), so a typo in a security setting is an error rather
// than a silently ignored default.
func decodeStrict(data []byte, out any) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("parse YAML: %w", err)
	}
	if len(doc.Content) == 0 {
		return nil // an empty document leaves every default in place
	}
	if errs := unknownKeys(doc.Content[0], reflect.TypeOf(out), ""); len(errs) > 0 {
		return errors.Join(errs...)
	}
	if err := doc.Content[0].Decode(out); err != nil {
		return fmt.Errorf("decode YAML: %w", err)
	}
	return nil
}

var durationType = reflect.TypeOf(time.Duration(0))

// unknownKeys walks n alongside t and reports every mapping key with no
// matching field.
func unknownKeys(n *yaml.Node, t reflect.Type, path string) []error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if _, ok := reflect.New(t).Interface().(yaml.Unmarshaler); ok {
		return nil
	}
	if t == durationType {
		if n.Kind == yaml.ScalarNode {
			if _, err := time.ParseDuration(n.Value); err != nil {
				return []error{fmt.Errorf("%s: want a duration such as 30s, 15m or 24h, got %q (line %d)", path, n.Value, n.Line)}
			}
		}
		return nil
	}
	var errs []error
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return nil // the decoder reports the type mismatch
		}
		fields := yamlFields(t)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := join(path, k.Value)
			ft, ok := fields[k.Value]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: unknown key (line %d); known keys here: %s", p, k.Line, strings.Join(sortedFieldNames(fields), ", ")))
				continue
			}
			errs = append(errs, unknownKeys(v, ft, p)...)
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode {
			return nil
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			errs = append(errs, unknownKeys(n.Content[i+1], t.Elem(), join(path, n.Content[i].Value))...)
		}
	case reflect.Slice, reflect.Array:
		if n.Kind != yaml.SequenceNode {
			return nil
		}
		for i, c := range n.Content {
			errs = append(errs, unknownKeys(c, t.Elem(), fmt.Sprintf("%s[%d]", path, i))...)
		}
	}
	return errs
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// yamlFields maps a struct's YAML keys to field types, following inlined
// structs the way yaml.v3 does.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	fields := map[string]reflect.Type{}
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		name, opts, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if strings.Contains(opts, "inline") {
			for k, v := range yamlFields(f.Type) {
				fields[k] = v
			}
			continue
		}
		if name == "" {
			name = strings.ToLower(f.Name)
		}
		fields[name] = f.Type
	}
	return fields
}

func sortedFieldNames(m map[string]reflect.Type) []string {
	return slices.Sorted(maps.Keys(m))
}
